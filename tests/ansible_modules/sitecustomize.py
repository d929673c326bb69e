# Imported at the start of every Ansible module the tests run (tests/ansible_modules/python puts
# this folder on PYTHONPATH): a bytecode cache for what AnsiballZ imports from its zip. Ansible
# sends each task's module with its module_utils as a zip of sources, and Python's zipimport
# compiles every source it imports from a zip, twice (once to name the file, once to run it), at
# every task: two fifths of the CPU of a playbook run on this machine. Compiled once per session,
# keyed by the source's SHA-256 in the session's bytecode folder, the modules run as Ansible sends
# them. The children a module starts (the role's `mailhub` and pip commands) do not get this.
import hashlib
import marshal
import os
import types
import zipimport

_FOLDER = os.path.join(os.environ.pop("TEST_ANSIBALLZ_CACHE"), "ansiballz")
os.environ.pop("PYTHONPATH", None)
_compile = zipimport._compile_source  # type: ignore[attr-defined]


def _named(code: types.CodeType, filename: str) -> types.CodeType:
    """The cached code with the file name of this run's zip (shown in a module's traceback)."""
    consts = tuple(_named(c, filename) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


def _compile_source(pathname: str, source: bytes) -> types.CodeType:
    path = os.path.join(_FOLDER, hashlib.sha256(source).hexdigest())
    try:
        with open(path, "rb") as cached:
            return _named(marshal.loads(cached.read()), pathname)
    except (OSError, ValueError, EOFError, TypeError):
        code = _compile(pathname, source)
    os.makedirs(_FOLDER, exist_ok=True)
    partial = f"{path}.{os.getpid()}"
    with open(partial, "wb") as out:  # renamed into place: modules of other workers read it at once
        out.write(marshal.dumps(code))
    os.replace(partial, path)
    return code


zipimport._compile_source = _compile_source  # type: ignore[attr-defined]
