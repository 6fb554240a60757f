"""``python -m convlens.cli``: the ``convlens`` command."""

from convlens.cli import main

if __name__ == "__main__":
    main()
