"""How progress bars are sized: tqdm's options for the terminal a bar goes to."""

import os


def bar_width_options(stream):
    """tqdm options for a bar on ``stream``: follow the terminal's width as it changes; 80
    columns when the terminal reports none (pseudo-terminals made by `script` or CI runners
    say 0x0, where a bar sized to the terminal would be drawn 0 columns wide, and hidden as
    below the terminal's last row)."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        columns = 0
    return {"dynamic_ncols": True} if columns else {"ncols": 80, "nrows": 24}
