"""Which vLLM internals that kitty_vllm uses changed between two vLLM releases, read statically.

    python scripts/vllm_interface_diff.py OLD_SRC NEW_SRC [--diff] [--tests]

OLD_SRC and NEW_SRC each hold a ``vllm`` package (a site-packages, or the .py files of a wheel:
``unzip -q vllm-0.34.0-*.whl 'vllm/*.py' -d /tmp/vllm-0.34.0``); nothing is imported, so any build works.
The symbols come from the code, by ``ast``: every ``vllm`` name that kitty_vllm imports and every
attribute it reads of one, every method a kitty class overrides from a vLLM base and every inherited member
it reads through ``self``, the WRAPPED table of tests/test_vllm_interfaces.py (with the parameters kitty
passes), and EXTRA below. Prints a Markdown table: symbol, used by, old signature, and its status in
NEW_SRC: same; same signature, code changed (with the members that changed, for a class); changed (how);
moved (where); gone. ``--diff`` appends a unified diff of each changed function; ``--tests`` adds what
tests/ uses.
"""

from __future__ import annotations

import argparse
import ast
import copy
import difflib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INTERFACE_TEST = REPO / "tests" / "test_vllm_interfaces.py"

# Members kitty reaches through objects that the AST cannot type (``type(current_platform)``, parameters,
# attributes): class -> (used by, members).
EXTRA = {
    "vllm.platforms.cuda:CudaPlatformBase": ("patches (type(current_platform))", [
        "get_attn_backend_cls", "check_and_update_config", "update_block_size_for_backend",
        "_align_heterogeneous_kv_block_size"]),
    "vllm.platforms.cpu:CpuPlatform": ("patches (type(current_platform))", [
        "get_attn_backend_cls", "check_and_update_config", "update_block_size_for_backend",
        "_align_heterogeneous_kv_block_size"]),
    "vllm.model_executor.layers.attention.attention:Attention": ("patches, stage, block_manager/mixed", [
        "layer_name", "kv_cache_dtype", "kv_sharing_target_layer_name", "num_kv_heads", "head_size", "dtype",
        "attn_type", "sliding_window"]),
    "vllm.v1.attention.selector:AttentionSelectorConfig": ("backend, patches", [
        "kv_cache_dtype", "use_mla", "use_sparse", "attn_type", "head_size", "dtype"]),
    "vllm.v1.attention.backend:CommonAttentionMetadata": ("backend, stage", [
        "num_reqs", "max_query_len", "seq_lens", "block_table_tensor", "query_start_loc", "query_start_loc_cpu"]),
    "vllm.v1.core.block_pool:BlockPool": ("block_manager/manager", [
        "get_cached_block", "get_new_blocks", "num_gpu_blocks", "hash_block_size"]),
    "vllm.v1.request:Request": ("block_manager/manager", ["request_id", "block_hashes"]),
    "vllm.v1.core.sched.scheduler:Scheduler": ("patches (make_stats)", [
        "cache_config", "kv_cache_manager", "kv_cache_config"]),
    "vllm.config.speculative:SpeculativeConfig": ("patches", [
        "uses_draft_model", "uses_draft_kv_cache", "kv_cache_dtype", "method", "num_speculative_tokens"]),
    "vllm.config.scheduler:SchedulerConfig": ("stage", ["max_num_batched_tokens", "long_prefill_token_threshold"]),
    "vllm.config.model:ModelConfig": ("patches, block_manager, metrics", ["dtype", "max_model_len",
                                                                          "served_model_name"]),
    "vllm.config.compilation:CompilationConfig": ("stage, block_manager/mixed", ["static_forward_context"]),
}


@dataclass
class Sym:
    module: str
    qualname: str
    node: ast.AST | None      # None: a module
    source: str


class Tree:
    """The ``vllm`` package under one root, parsed lazily."""

    def __init__(self, root: str):
        self.root, self._modules = Path(root), {}

    def module(self, name: str):
        if name not in self._modules:
            base = self.root.joinpath(*name.split("."))
            path = next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)
            self._modules[name] = None if path is None else (path.read_text(), ast.parse(path.read_text()))
        return self._modules[name]

    def _toplevel(self, module: str, name: str):
        """The statement that binds ``name`` at the top of ``module`` (inside if/try blocks too)."""
        stack = list(reversed(self.module(module)[1].body))
        while stack:
            stmt = stack.pop()
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and stmt.name == name \
                    and not _is_overload(stmt):
                return stmt
            if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    return stmt
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                for alias in stmt.names:
                    if (alias.asname or alias.name.split(".")[0]) == name:
                        return stmt, alias
            if isinstance(stmt, (ast.If, ast.Try, ast.ExceptHandler)):
                stack.extend(reversed([s for block in ("body", "orelse", "handlers", "finalbody")
                                       for s in getattr(stmt, block, [])]))
        return None

    def lookup(self, module: str, name: str, depth: int = 0) -> Sym | None:
        """``module.name``, following re-exports, lazy ``MODULE_ATTRS`` and submodules."""
        if self.module(module) is None or depth > 10:
            return None
        found = self._toplevel(module, name)
        if isinstance(found, tuple):
            stmt, alias = found
            if isinstance(stmt, ast.Import):
                return self.lookup_path(alias.name) if alias.asname else None
            target = _absolute(module, stmt, self._is_package(module))
            return self.lookup(target, alias.name, depth + 1) or self.lookup_path(f"{target}.{alias.name}")
        if found is not None:
            return Sym(module, name, found, self.module(module)[0])
        if self.module(f"{module}.{name}") is not None:
            return self.lookup_path(f"{module}.{name}")
        lazy = self._toplevel(module, "MODULE_ATTRS")
        if isinstance(lazy, ast.Assign):
            target = ast.literal_eval(lazy.value).get(name)
            if target:
                sub, attr = target.split(":")
                return self.lookup(module + sub if sub.startswith(".") else sub, attr, depth + 1)
        return None

    def version(self) -> str:
        """vLLM's version, from ``vllm/_version.py`` (else the folder's name)."""
        found = self.module("vllm._version")
        match = found and re.search(r"^__version__ = .*['\"](.+)['\"]", found[0], re.M)
        return match.group(1) if match else self.root.name

    def _is_package(self, module: str) -> bool:
        return self.root.joinpath(*module.split("."), "__init__.py").is_file()

    def lookup_path(self, module: str) -> Sym | None:
        return Sym(module, "", None, "") if self.module(module) is not None else None

    def resolve(self, key: str) -> Sym | None:
        """``package.module:Qual.name``: a top-level name, then members through the class's bases."""
        module, _, qualname = key.partition(":")
        if not qualname:
            return self.lookup_path(module)
        head, *rest = qualname.split(".")
        sym = self.lookup(module, head)
        for attr in rest:
            if sym is None:
                return None
            if sym.node is None:
                sym = self.lookup(sym.module, attr)
            elif isinstance(sym.node, ast.ClassDef):
                sym = self.member(sym, attr)
            else:
                return None
        return sym

    def member(self, cls: Sym, attr: str, seen=()) -> Sym | None:
        """``attr`` of class ``cls``: its body, ``self.attr =`` in its methods, then its bases."""
        for stmt in cls.node.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and stmt.name == attr \
                    and not _is_overload(stmt):
                return Sym(cls.module, f"{cls.qualname}.{attr}", stmt, cls.source)
            targets = (stmt.targets if isinstance(stmt, ast.Assign) else
                       [stmt.target] if isinstance(stmt, ast.AnnAssign) else [])
            if any(isinstance(t, ast.Name) and t.id == attr for t in targets):
                return Sym(cls.module, f"{cls.qualname}.{attr}", stmt, cls.source)
        for node in ast.walk(cls.node):
            if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and node.attr == attr
                    and isinstance(node.value, ast.Name) and node.value.id == "self"):
                return Sym(cls.module, f"{cls.qualname}.{attr}", node, cls.source)
        for base in self.bases(cls):
            if (base.module, base.qualname) not in seen:
                found = self.member(base, attr, seen + ((cls.module, cls.qualname),))
                if found is not None:
                    return found
        return None

    def bases(self, cls: Sym) -> list[Sym]:
        out = []
        for expr in cls.node.bases:
            expr = expr.value if isinstance(expr, ast.Subscript) else expr
            sym = self.resolve_expr(cls.module, expr)
            if sym is not None and isinstance(sym.node, ast.ClassDef):
                out.append(sym)
        return out

    def resolve_expr(self, module: str, expr: ast.expr) -> Sym | None:
        if isinstance(expr, ast.Name):
            return self.lookup(module, expr.id)
        if isinstance(expr, ast.Attribute):
            owner = self.resolve_expr(module, expr.value)
            if owner is not None and owner.node is None:
                return self.lookup(owner.module, expr.attr)
            if owner is not None and isinstance(owner.node, ast.ClassDef):
                return self.member(owner, expr.attr)
        return None

    def find_elsewhere(self, name: str) -> list[str]:
        """Modules of this tree that define ``name`` at top level (a moved symbol's candidates)."""
        pattern = re.compile(rf"^(?:class|def|async def) {re.escape(name)}\b|^{re.escape(name)}\s*[:=]", re.M)
        hits = []
        for path in sorted(self.root.joinpath("vllm").rglob("*.py")):
            if pattern.search(path.read_text(errors="replace")):
                parts = path.relative_to(self.root).with_suffix("").parts
                hits.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        return hits


def _is_overload(node) -> bool:
    """A ``typing.overload`` stub, which the real definition after it replaces."""
    return not isinstance(node, ast.ClassDef) and any(
        ast.unparse(d) in ("overload", "typing.overload") for d in node.decorator_list)


def _absolute(module: str, stmt: ast.ImportFrom, is_package: bool) -> str:
    if not stmt.level:
        return stmt.module
    parts = module.split(".")
    parts = parts[: len(parts) - stmt.level + (1 if is_package else 0)]
    return ".".join(parts + ([stmt.module] if stmt.module else []))


# What kitty_vllm uses ------------------------------------------------------------------------------

def plugin_uses(tree: Tree, packages: list[str]) -> dict[str, set[str]]:
    """``module:qualname`` -> where the packages use it, read off their source with ``tree`` (the old vLLM)."""
    uses: dict[str, set[str]] = {}

    def use(key, where):
        uses.setdefault(key, set()).add(where)

    for path in sorted(p for package in packages for p in (REPO / package).rglob("*.py")):
        where = str(path.relative_to(REPO).with_suffix("")).removeprefix("kitty_vllm/")
        code = ast.parse(path.read_text())
        local: dict[str, str] = {}
        for node in ast.walk(code):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm":
                for alias in node.names:
                    local[alias.asname or alias.name] = f"{node.module}:{alias.name}"
                    use(local[alias.asname or alias.name], where)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "vllm":
                        local[alias.asname or alias.name] = alias.name
                        use(alias.name, where)
        for node in ast.walk(code):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in local:
                key = local[node.value.id]
                sym = tree.resolve(key)
                joined = f"{sym.module}:{node.attr}" if sym is not None and sym.node is None else f"{key}.{node.attr}"
                if sym is not None and tree.resolve(joined) is not None:
                    use(joined, where)
            if isinstance(node, ast.ClassDef):
                vllm_bases = [local[b.id] for b in (e.value if isinstance(e, ast.Subscript) else e
                                                    for e in node.bases)
                              if isinstance(b, ast.Name) and b.id in local]
                own = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
                read = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
                        and isinstance(n.value, ast.Name) and n.value.id == "self"}
                for base in vllm_bases:
                    for name, kind in [(n, "override") for n in own] + [(n, "inherited") for n in read - own]:
                        if tree.resolve(f"{base}.{name}") is not None:
                            use(f"{base}.{name}", f"{where} ({kind} in {node.name})")
    return uses


def wrapped_table() -> dict[str, list[str]]:
    """The WRAPPED dict of tests/test_vllm_interfaces.py: symbol -> parameters kitty relies on."""
    for node in ast.walk(ast.parse(INTERFACE_TEST.read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "WRAPPED" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


# Comparing ----------------------------------------------------------------------------------------

def _params(node) -> list[tuple[str, str]]:
    """(name, kind and default) of each parameter of a def."""
    args, out = node.args, []
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + args.defaults
    for i, (arg, default) in enumerate(zip(positional, defaults)):
        kind = "posonly" if i < len(args.posonlyargs) else ""
        out.append((arg.arg, kind + ("" if default is None else f"={ast.unparse(default)}")))
    if args.vararg:
        out.append(("*" + args.vararg.arg, ""))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        out.append((arg.arg, "kwonly" + ("" if default is None else f"={ast.unparse(default)}")))
    if args.kwarg:
        out.append(("**" + args.kwarg.arg, ""))
    return out


def _decorators(node) -> str:
    return "".join(f"@{ast.unparse(d)} " for d in node.decorator_list if ast.unparse(d) in
                   ("staticmethod", "classmethod", "property", "abstractmethod", "cached_property"))


def _fields(node: ast.ClassDef) -> list[str]:
    names = []
    for stmt in node.body:
        targets = (stmt.targets if isinstance(stmt, ast.Assign) else
                   [stmt.target] if isinstance(stmt, ast.AnnAssign) else [])
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def _members(node: ast.ClassDef) -> dict[str, str]:
    return {stmt.name: ast.dump(stmt) for stmt in node.body
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def _bare(args: ast.arguments) -> str:
    """The parameter list without annotations."""
    args = copy.deepcopy(args)
    for arg in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
        if arg is not None:
            arg.annotation = None
    return ast.unparse(args)


def signature(sym: Sym) -> str:
    node = sym.node
    if node is None:
        return "module"
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return f"{_decorators(node)}({_bare(node.args)})"
    if isinstance(node, ast.ClassDef):
        return f"class({', '.join(map(ast.unparse, node.bases))})"
    if isinstance(node, ast.Attribute):
        return "instance attribute"
    text = (f": {ast.unparse(node.annotation)}" if isinstance(node, ast.AnnAssign) else "") + (
        "" if node.value is None else f" = {ast.unparse(node.value)}")
    return text.strip() if len(text) <= 80 else text.strip()[:80] + "…"


def compare(old: Sym, new: Sym) -> str:
    """How ``new`` differs from ``old``: '' when the code is identical."""
    a, b = old.node, new.node
    if a is None or b is None:
        return "" if a is b else "changed: module vs. object"
    if type(a) is not type(b):
        return f"changed: {type(a).__name__} -> {type(b).__name__}"
    if ast.dump(a) == ast.dump(b):
        return ""
    if isinstance(a, (ast.FunctionDef, ast.AsyncFunctionDef)):
        pa, pb = dict(_params(a)), dict(_params(b))
        notes = [f"-{n}" for n in pa if n not in pb] + [f"+{n}{'=' + pb[n].split('=', 1)[1] if '=' in pb[n] else ''}"
                                                       for n in pb if n not in pa]
        notes += [f"{n}: {pa[n] or 'required'} -> {pb[n] or 'required'}" for n in pa if n in pb and pa[n] != pb[n]]
        if [n for n in pa if n in pb] != [n for n in pb if n in pa]:
            notes.append("parameters reordered")
        if _decorators(a) != _decorators(b):
            notes.append(f"decorators {_decorators(a) or 'none'}-> {_decorators(b) or 'none'}")
        return "changed: " + "; ".join(notes) if notes else "same signature, code changed"
    if isinstance(a, ast.ClassDef):
        breaking = []
        if list(map(ast.unparse, a.bases)) != list(map(ast.unparse, b.bases)):
            breaking.append(f"bases ({', '.join(map(ast.unparse, b.bases))})")
        fa, fb = _fields(a), _fields(b)
        if set(fa) != set(fb):
            breaking.append("class-level names " + " ".join([f"-{n}" for n in fa if n not in fb] +
                                                            [f"+{n}" for n in fb if n not in fa]))
        ma, mb = _members(a), _members(b)
        notes = [f"{label}: {', '.join(names[:8])}{f' +{len(names) - 8} more' if len(names) > 8 else ''}"
                 for label, names in (("methods added", [n for n in mb if n not in ma]),
                                      ("removed", [n for n in ma if n not in mb]),
                                      ("changed", [n for n in ma if n in mb and ma[n] != mb[n]])) if names]
        prefix = "changed: " if breaking or any(n.startswith("removed") for n in notes) else "same names; "
        return prefix + "; ".join(breaking + notes) if breaking or notes else "same names, code changed"
    if isinstance(a, ast.Attribute):
        return ""
    ea, eb = _elements(a.value), _elements(b.value)
    if ea is not None and eb is not None:
        return "changed: " + " ".join([f"-{e}" for e in ea if e not in eb] + [f"+{e}" for e in eb if e not in ea])
    return f"changed: `{signature(new)}`"


def _elements(value) -> list[str] | None:
    """The items of a literal collection (a dict's keys, ``Literal[...]``'s arguments), if it is one."""
    if isinstance(value, ast.Subscript):
        value = value.slice
    if isinstance(value, ast.Dict):
        return [ast.unparse(k) for k in value.keys if k is not None]
    if isinstance(value, (ast.Tuple, ast.List, ast.Set)):
        return [ast.unparse(e) for e in value.elts]
    return None


def status(key: str, old_tree: Tree, new_tree: Tree, required: list[str] | None) -> tuple[str, str, Sym | None]:
    """(old signature, status in the new tree, the new symbol)."""
    old = old_tree.resolve(key)
    if old is None:
        return "not in OLD_SRC", "—", None
    new, where = new_tree.resolve(key), ""
    if new is None:
        module, _, qualname = key.partition(":")
        for candidate in new_tree.find_elsewhere((qualname or module.rsplit(".", 1)[-1]).split(".")[0]):
            new = new_tree.resolve(f"{candidate}:{qualname}") if qualname else None
            if new is not None:
                where = f"moved to {candidate}"
                break
        if new is None:
            return signature(old), "**gone**", None
    located = "" if (old.module, old.qualname) == (new.module, new.qualname) or where else \
        f" (now defined in {new.module}:{new.qualname})"
    change = compare(old, new)
    if required and isinstance(new.node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        missing = [p for p in required if p not in dict(_params(new.node))]
        if missing:
            change = f"**kitty passes {missing}, gone**; " + change
    if required and isinstance(new.node, ast.ClassDef):
        missing = [p for p in required if new_tree.member(new, p) is None]
        if missing:
            change = f"**kitty reads {missing}, gone**; " + change
    text = "; ".join(filter(None, [where, change])) or "same"
    return signature(old), (f"**{text}**" if text.startswith(("changed", "moved")) else text) + located, new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old_src")
    parser.add_argument("new_src")
    parser.add_argument("--diff", action="store_true", help="append unified diffs of changed functions")
    parser.add_argument("--tests", action="store_true", help="also what tests/ imports from vLLM")
    args = parser.parse_args()
    old_tree, new_tree = Tree(args.old_src), Tree(args.new_src)
    uses = plugin_uses(old_tree, ["kitty_vllm"] + ["tests"] * args.tests)
    wrapped = wrapped_table()
    for key in wrapped:
        uses.setdefault(key, set()).add("test_vllm_interfaces WRAPPED")
    for cls, (where, members) in EXTRA.items():
        for member in members:
            uses.setdefault(f"{cls}.{member}", set()).add(where)
    print(f"| vLLM symbol | used by | {old_tree.version()} signature | {new_tree.version()} status |")
    print("|---|---|---|---|")
    diffs = []
    for key in sorted(uses):
        old_sig, state, new = status(key, old_tree, new_tree, wrapped.get(key))
        cells = [f"`{key}`", ", ".join(sorted(uses[key])), f"`{old_sig}`", state]
        print("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        old = old_tree.resolve(key)
        if (args.diff and new is not None and isinstance(old.node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and compare(old, new)):
            diffs.append(difflib.unified_diff(
                ast.get_source_segment(old.source, old.node).splitlines(),
                ast.get_source_segment(new.source, new.node).splitlines(),
                f"{args.old_src}: {key}", f"{args.new_src}: {key}", lineterm=""))
    for diff in diffs:
        print("\n```diff\n" + "\n".join(diff) + "\n```")


if __name__ == "__main__":
    sys.exit(main())
