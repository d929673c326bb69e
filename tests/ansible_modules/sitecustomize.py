# Imported at the start of every Ansible module the tests run (tests/ansible_modules/python puts
# this folder on PYTHONPATH): a bytecode cache for what AnsiballZ imports from its zip. Ansible
# sends each task's module with its module_utils as a zip of sources, and Python's zipimport
# compiles every source it imports from a zip, twice (once to name the file, once to run it), at
# every task: two fifths of the CPU of a playbook run on this machine. Compiled once per session,
# keyed by the source's SHA-256 in the session's bytecode folder, the modules run as Ansible sends
# them. The children a module starts (the role's `mailhub` and pip commands) do not get this.
import contextlib
import hashlib
import importlib.util
import marshal
import os
import types
import zipimport

os.environ.pop("PYTHONPATH", None)
_CACHE = os.environ.pop("TEST_ANSIBALLZ_CACHE", "")  # unset: no cache
_FOLDER = os.path.join(_CACHE, "ansiballz")
_MAGIC = importlib.util.MAGIC_NUMBER  # in the key: a cache outliving a Python upgrade is not misread
_compile = zipimport._compile_source  # type: ignore[attr-defined]


def _named(code: types.CodeType, filename: str) -> types.CodeType:
    """The cached code with the file name of this run's zip (shown in a module's traceback)."""
    consts = tuple(_named(c, filename) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


def _compile_source(pathname: str, source: bytes) -> types.CodeType:
    path = os.path.join(_FOLDER, hashlib.sha256(_MAGIC + source).hexdigest())
    try:
        with open(path, "rb") as cached:
            return _named(marshal.loads(cached.read()), pathname)
    except (OSError, ValueError, EOFError, TypeError):
        code = _compile(pathname, source)
    partial = f"{path}.{os.getpid()}.{os.urandom(4).hex()}"
    try:  # renamed into place: modules of other workers read it at once; a cache it cannot write is no error
        os.makedirs(_FOLDER, exist_ok=True)
        with open(partial, "wb") as out:
            out.write(marshal.dumps(code))
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(partial)
    return code


if _CACHE:
    zipimport._compile_source = _compile_source  # type: ignore[attr-defined]
