"""matplotlib (the `plots` extra), imported only by what draws a figure."""

from __future__ import annotations

from .errors import UserError


def pyplot(written: str = ""):
    """`matplotlib.pyplot` on the file-only Agg backend, or one line naming the extra.

    `written` says what was saved before the plots were reached, so the message can say it.
    """
    try:
        import matplotlib
    except ImportError:
        raise UserError(
            f"{written}the plots need matplotlib: pip install 'imagetransformer[plots]' "
            "(or matplotlib), then run the command again"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
