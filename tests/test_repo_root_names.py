"""Nothing at the repository root may hide an installed distribution's top-level module.

`python -m pytest`, `python -m aimkern.train` and `python -c` put the working directory first on `sys.path`.
A folder at the root with an `__init__.py` (a regular package) then wins over any installed package of the
same name: the root `kernels/` once hid Hugging Face's `kernels` (a transformers dependency), so
`from transformers import ViTModel` failed from a clone and nowhere else. A folder without `__init__.py` is
only a namespace portion, which an installed regular package always beats.

`shadowed(root, site)` answers the question in a fresh interpreter started in `root`, exactly as a user's
command would resolve the names. The real check runs it on this repository against this venv; the other
tests run it on a made-up root and a made-up installed distribution, so the guard itself is proven to fail
on the layout that broke (whatever this venv holds).
"""
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = textwrap.dedent("""
    import importlib.metadata, importlib.util, json, os, sys
    root = os.path.realpath(os.getcwd())
    provided = importlib.metadata.packages_distributions()
    names = set()
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if os.path.isdir(path) and entry.isidentifier():
            names.add(entry)
        elif entry.endswith(".py") and entry[:-3].isidentifier():
            names.add(entry[:-3])
    found = {}
    own = {"aimkern"}  # the project's own package, provided by the project's own (editable) install
    for name in sorted((names & set(provided)) - own):
        spec = importlib.util.find_spec(name)
        places = [spec.origin] if spec and spec.origin else []
        places += list(spec.submodule_search_locations or []) if spec else []
        # The repository's own entry of that name (a venv inside the clone is not the clone's code).
        mine = (os.path.join(root, name), os.path.join(root, name + ".py"))
        inside = [p for p in places if p and (os.path.realpath(p) in mine
                                              or os.path.realpath(p).startswith(mine[0] + os.sep))]
        if inside:
            found[name] = {"distributions": provided[name], "resolves_to": inside}
    print(json.dumps(found))
""")


def shadowed(root: str, site: str = None) -> dict:
    """Top-level names that an installed distribution provides but that resolve into `root` when run there.

    `site`: an extra folder of installed distributions (for the self-tests); the current venv is always seen.
    Returns {name: {"distributions": [...], "resolves_to": [paths inside root]}}.
    """
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if site:
        env["PYTHONPATH"] = site  # after '' (the working directory), like site-packages
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=root, env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout)


def _fake_distribution(site: str, name: str) -> None:
    """An installed distribution `name` whose top-level module is the regular package `name`."""
    os.makedirs(os.path.join(site, name))
    with open(os.path.join(site, name, "__init__.py"), "w") as f:
        f.write("REAL = True\n")
    info = os.path.join(site, f"{name}-1.0.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    with open(os.path.join(info, "top_level.txt"), "w") as f:
        f.write(name + "\n")
    with open(os.path.join(info, "RECORD"), "w") as f:
        f.write(f"{name}/__init__.py,,\n")


def test_repository_root_hides_no_installed_distribution():
    found = shadowed(ROOT)
    assert not found, (
        f"run from the repository root, these names resolve to the repository's folders and hide installed "
        f"distributions: {found}. Remove the folder's __init__.py (keep it a namespace folder) or rename it.")


def test_no_regular_package_at_the_root():
    """Whatever this venv holds, a root folder with an __init__.py would hide a future distribution of its name."""
    regular = [entry for entry in os.listdir(ROOT)
               if entry != "aimkern" and os.path.isfile(os.path.join(ROOT, entry, "__init__.py"))]
    assert not regular, f"regular packages at the repository root: {regular}; reach kernels as aimkern.kernels"


def test_guard_fails_on_the_layout_that_broke(tmp_path):
    """A root `kernels/__init__.py` beside an installed `kernels` is caught, with both sides named."""
    site, root = tmp_path / "site", tmp_path / "repo"
    _fake_distribution(str(site), "kernels")
    (root / "kernels").mkdir(parents=True)
    (root / "kernels" / "__init__.py").write_text("")
    found = shadowed(str(root), str(site))
    assert list(found) == ["kernels"] and "kernels" in found["kernels"]["distributions"]


def test_guard_passes_a_namespace_folder(tmp_path):
    """The fix: the same folder without __init__.py loses to the installed package."""
    site, root = tmp_path / "site", tmp_path / "repo"
    _fake_distribution(str(site), "kernels")
    (root / "kernels").mkdir(parents=True)
    (root / "kernels" / "attention.py").write_text("")
    assert shadowed(str(root), str(site)) == {}


def test_kernels_reachable_as_aimkern_kernels():
    """The kernel modules are importable under the package name, from the root, with or without `kernels`."""
    code = "import aimkern.kernels.launch_table as m, os; print(os.path.realpath(m.__file__))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=120)
    assert os.path.realpath(out.stdout.strip()) == os.path.realpath(os.path.join(ROOT, "kernels", "launch_table.py"))
