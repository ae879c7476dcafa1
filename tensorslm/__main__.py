"""``python -m tensorslm``: the same as the ``tensorslm`` console script."""
from tensorslm.cli import main

if __name__ == "__main__":
    main()
