# What the command-line entry points (`mailhub`, `mailhub-loadtest`) share: the installed package's
# version for `--version`.
import importlib.metadata

DISTRIBUTION = "dicom-mail-hub"


def version() -> str:
    """The installed package's version ("unknown" when run from a source tree never installed)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"
