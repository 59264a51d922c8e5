"""Known SAM2 weights, as data: where to get them, how to check them, which sam2 config builds them."""

from __future__ import annotations

from dataclasses import dataclass, field

from sslmedsam2.errors import UserError

_META = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    url: str
    sha256: str
    size_bytes: int
    config: str  # a config name inside the sam2 package
    image_size: int
    overrides: tuple[str, ...] = field(default=())  # hydra overrides on top of `config`
    note: str = ""

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("sam2.1-tiny", f"{_META}/sam2.1_hiera_tiny.pt",
                  "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69", 156008466,
                  "configs/sam2.1/sam2.1_hiera_t.yaml", 1024, note="Meta SAM 2.1 Hiera-T, 39 M parameters"),
        ModelSpec("sam2.1-small", f"{_META}/sam2.1_hiera_small.pt",
                  "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38", 184416285,
                  "configs/sam2.1/sam2.1_hiera_s.yaml", 1024, note="Meta SAM 2.1 Hiera-S, 46 M parameters"),
        ModelSpec("sam2.1-base-plus", f"{_META}/sam2.1_hiera_base_plus.pt",
                  "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5", 323606802,
                  "configs/sam2.1/sam2.1_hiera_b+.yaml", 1024, note="Meta SAM 2.1 Hiera-B+, 81 M parameters"),
        ModelSpec("sam2.1-large", f"{_META}/sam2.1_hiera_large.pt",
                  "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318", 898083611,
                  "configs/sam2.1/sam2.1_hiera_l.yaml", 1024, note="Meta SAM 2.1 Hiera-L, 224 M parameters"),
        # MedSAM2's own sam2.1_hiera_t512.yaml is Meta's Hiera-T config at image size 512; the image-size
        # override (which also sets the RoPE feature size to 32x32) rebuilds it from the packaged config.
        ModelSpec("medsam2", "https://huggingface.co/wanglab/MedSAM2/resolve/main/MedSAM2_latest.pt",
                  "c92743b99f00d078bf32a3afcc38aaa9faf1c1692dffe3eaa7a90938c1991060", 156040129,
                  "configs/sam2.1/sam2.1_hiera_t.yaml", 512, note="MedSAM2 (Wang lab), SAM 2.1 Hiera-T fine-tuned on 3D medical data"),
    )
}

DEFAULT_MODEL = "medsam2"


# SAM2's encoder at 4096 needs tens of GB for one slice; its models were trained at 1024 (MedSAM2 at 512).
MAX_IMAGE_SIZE = 2048


def image_size_problem(size: int) -> str | None:
    """Why `size` cannot be SAM2's image size (a multiple of 16, 64 to MAX_IMAGE_SIZE: below 64 its feature maps
    vanish), or None."""
    if isinstance(size, bool) or not isinstance(size, int) or size % 16 or not 64 <= size <= MAX_IMAGE_SIZE:
        return f"--image-size {size}: must be a multiple of 16 from 64 to {MAX_IMAGE_SIZE}"
    return None


def check_image_size(size: int) -> int:
    problem = image_size_problem(size)
    if problem:
        raise UserError(problem)
    return int(size)


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None
