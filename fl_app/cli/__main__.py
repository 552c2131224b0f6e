"""``python -m fl_app.cli``: the ``fl-app`` command without the console script."""

from fl_app.cli import main

main()
