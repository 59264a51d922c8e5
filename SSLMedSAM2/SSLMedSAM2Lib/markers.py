"""The review marker: a line of text in a slice view saying the shown slice's review state and confidence.

No Slicer import here: actors and renderers come from factories (scene_io passes VTK's), so the life cycle is
tested headless. An actor stays in its renderer until removed, showing the last text, frozen; so the module clears
the markers when it is left and when the scene closes (the review they describe is gone then).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class ReviewMarkers:
    """At most one marker per slice view, each remembered with the renderer it was added to."""

    def __init__(self, new_actor: Callable[[], Any], renderer_of: Callable[[str], Any | None],
                 render: Callable[[str], None]) -> None:
        self._new_actor, self._renderer_of, self._render = new_actor, renderer_of, render
        self._shown: dict[str, tuple[Any, Any]] = {}  # view name -> (renderer, actor)

    @property
    def views(self) -> list[str]:
        return list(self._shown)

    def show(self, view: str, text: str) -> None:
        """Show (or update) the view's marker; nothing when the layout has no such view."""
        renderer = self._renderer_of(view)
        if renderer is None:
            return
        shown = self._shown.get(view)
        if shown is None or shown[0] != renderer:  # first time, or the view was rebuilt (layout change)
            if shown is not None:
                shown[0].RemoveActor2D(shown[1])
            actor = self._new_actor()
            renderer.AddActor2D(actor)
            shown = self._shown[view] = (renderer, actor)
        shown[1].SetInput(text)
        self._render(view)

    def clear(self) -> None:
        """Remove every marker from its renderer and redraw those views."""
        shown, self._shown = self._shown, {}
        for view, (renderer, actor) in shown.items():
            renderer.RemoveActor2D(actor)
            self._render(view)
