"""Label maps and what comes with them: the drawn seeds, a result and its per-slice confidence table."""
