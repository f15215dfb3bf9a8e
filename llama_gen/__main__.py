"""`llama-gen` and `python -m llama_gen` start here: the lifeline first, then the CLI."""
import os

PARENT = os.getppid()  # first, before any slow import: the launcher the lifeline watches

from .runtime import lifeline  # noqa: E402  (standard library only)


def main() -> None:
    lifeline.arm(PARENT)
    from .cli.main import main as cli_main  # imports torch: a second or more
    cli_main()


if __name__ == "__main__":
    main()
