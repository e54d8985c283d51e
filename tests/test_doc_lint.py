"""Docs name only kernels that exist: a renamed or removed @triton.jit function leaves no stale mention.

Read with ast and tokenize, nothing imported (no Triton, no interpreter, no GPU needed):

1. Every ``*_kernel`` identifier in a docstring (module, class, function) or a comment of kernels/*.py and
   aimkern/**/*.py, and in docs/design.md and kernels/README.md, is a @triton.jit function of kernels/.
2. Every ``name`` (or ``name(...)``) in double backticks in a kernels/ docstring is defined in kernels/: a
   @triton.jit helper such as ``flat_program``, another function, a class, a constant or a parameter.
3. Each kernels/ module's docstring names every ``*_kernel`` it defines (kernels/cross_entropy.py's once
   left out ``ce_dlogits_inplace_kernel``; those of attention_fwd.py, the tiled backward's key-tail kernel
   and pixel_loss.py named none).

The last tests run the three rules on made-up sources, so each is shown to fail on what it guards against.
"""
import ast
import io
import os
import re
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "kernels")
# Kernel-like names of other libraries that a comment may mention (torch.nn.attention.sdpa_kernel).
EXTERNAL = {"sdpa_kernel"}
KERNEL_NAME = re.compile(r"\b[A-Za-z_]\w*_kernel\b")
BACKTICKED = re.compile(r"``([A-Za-z_]\w*)(?:\([^`]*\))?``")


def _is_jit(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return ast.unparse(target) in ("triton.jit", "jit")


def jit_functions(sources: dict) -> set:
    """Names of the @triton.jit functions of ``sources`` ({path: text})."""
    return {node.name for text in sources.values() for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.FunctionDef) and any(_is_jit(d) for d in node.decorator_list)}


def defined_names(sources: dict) -> set:
    """Everything ``sources`` define: functions, classes, assigned names, parameters, imported names."""
    names = set()
    for text in sources.values():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.alias):
                names.add(node.asname or node.name)
    return names


def docstrings(text: str) -> list:
    """(owner, docstring) of the module and of every class and function in ``text``."""
    tree = ast.parse(text)
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    return [(getattr(n, "name", "<module>"), ast.get_docstring(n, clean=False)) for n in nodes
            if ast.get_docstring(n, clean=False)]


def comments(text: str) -> list:
    return [tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline)
            if tok.type == tokenize.COMMENT]


def unknown_kernel_names(path: str, text: str, kernels: set) -> list:
    """Rule 1: (path, where, name) of each ``*_kernel`` mention that is no @triton.jit function."""
    if path.endswith(".md"):
        parts = [("text", text)]
    else:
        parts = docstrings(text) + [("comment", c) for c in comments(text)]
    return [(path, where, name) for where, part in parts for name in sorted(set(KERNEL_NAME.findall(part)))
            if name not in kernels and name not in EXTERNAL]


def undefined_backticked(path: str, text: str, defined: set) -> list:
    """Rule 2 (kernels/ sources): (path, owner, name) of each ``name`` in a docstring that kernels/ lacks."""
    return [(path, owner, name) for owner, doc in docstrings(text)
            for name in sorted(set(BACKTICKED.findall(doc))) if name not in defined]


def unlisted_kernels(path: str, text: str) -> list:
    """Rule 3: (path, name) of each ``*_kernel`` the module defines that its docstring does not name."""
    doc = ast.get_docstring(ast.parse(text)) or ""
    own = jit_functions({path: text})
    return [(path, name) for name in sorted(own) if name.endswith("_kernel") and name not in KERNEL_NAME.findall(doc)]


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def kernel_sources() -> dict:
    return {os.path.relpath(os.path.join(KERNELS, f), ROOT): _read(os.path.join(KERNELS, f))
            for f in sorted(os.listdir(KERNELS)) if f.endswith(".py")}


def package_sources() -> dict:
    """aimkern/**/*.py, without the aimkern/kernels link (kernel_sources reads those files)."""
    out = {}
    for folder, dirs, files in os.walk(os.path.join(ROOT, "aimkern")):  # os.walk does not follow the link
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py"):
                out[os.path.relpath(os.path.join(folder, f), ROOT)] = _read(os.path.join(folder, f))
    return out


# ---------------------------------------------------------------------------------- the repository
def test_every_kernel_named_in_the_docs_exists():
    kernels = kernel_sources()
    jit = jit_functions(kernels)
    assert {"attn_fwd_kernel", "flat_program", "ce_dlogits_inplace_kernel"} <= jit  # the reader finds them
    docs = {p: _read(os.path.join(ROOT, p)) for p in ("docs/design.md", "kernels/README.md")}
    sources = {**kernels, **package_sources(), **docs}
    assert len(sources) > 50
    bad = [hit for path, text in sources.items() for hit in unknown_kernel_names(path, text, jit)]
    assert not bad, f"kernel names that no @triton.jit function in kernels/ has: {bad}"


def test_every_name_in_a_kernel_docstring_is_defined_in_kernels():
    kernels = kernel_sources()
    defined = defined_names(kernels)
    bad = [hit for path, text in kernels.items() for hit in undefined_backticked(path, text, defined)]
    assert not bad, f"``names`` in kernels/ docstrings that kernels/ does not define: {bad}"


def test_each_kernel_module_docstring_lists_its_kernels():
    bad = [hit for path, text in kernel_sources().items() for hit in unlisted_kernels(path, text)]
    assert not bad, f"kernels missing from their module's docstring: {bad}"


# ------------------------------------------------------------------ the rules fail on what they guard
MADE_UP = '''"""Two kernels: ``ce_fwd_kernel`` and ``attn_bwd_dq_kernel``, grid from ``flat_programme``."""
import triton


@triton.jit
def ce_fwd_kernel(X, BLOCK: tl.constexpr):
    """Calls ``_helper``; BLOCK is a constexpr."""
    pass  # beside attn_bwd_dkdv_kernel once


@triton.jit
def forgotten_kernel(X):
    pass
'''


def test_rule_1_catches_a_made_up_kernel_name():
    jit = jit_functions({"made_up.py": MADE_UP})
    assert jit == {"ce_fwd_kernel", "forgotten_kernel"}
    assert unknown_kernel_names("made_up.py", MADE_UP, jit) == [
        ("made_up.py", "<module>", "attn_bwd_dq_kernel"), ("made_up.py", "comment", "attn_bwd_dkdv_kernel")]
    assert unknown_kernel_names("d.md", "`matmul_kernel` and `flash_fwd_kernel`", {"matmul_kernel"}) == [
        ("d.md", "text", "flash_fwd_kernel")]
    assert unknown_kernel_names("t.py", "# torch's sdpa_kernel picks the backend\n", set()) == []


def test_rule_2_catches_a_backticked_name_kernels_lacks():
    defined = defined_names({"made_up.py": MADE_UP})
    assert {"ce_fwd_kernel", "BLOCK", "X", "triton"} <= defined
    assert undefined_backticked("made_up.py", MADE_UP, defined) == [
        ("made_up.py", "<module>", "attn_bwd_dq_kernel"), ("made_up.py", "<module>", "flat_programme"),
        ("made_up.py", "ce_fwd_kernel", "_helper")]


def test_rule_3_catches_a_kernel_its_module_docstring_leaves_out():
    assert unlisted_kernels("made_up.py", MADE_UP) == [("made_up.py", "forgotten_kernel")]
