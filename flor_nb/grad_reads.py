"""Whether code may read the gradients (``p.grad``, ``backward()``, an optimizer's ``step()``): the judgement
behind leaving gradients out of checkpoints (liveness.py).

At record time calls are judged with the kernel's namespace (:func:`record_judge`); at replay, probe lines are
judged from the cells' code alone (:func:`probe_judge`). Both answer "may read" whenever they cannot tell.
"""
from __future__ import annotations

import ast

DYNAMIC = {"globals", "locals", "vars", "eval", "exec", "__import__", "__dict__"}
READS_GRADS = {"grad", "backward", "step", "zero_grad", "clip_grad_norm_", "clip_grad_value_", "getattr",
               "named_parameters", "grad_norm", "autograd"}
# Names with "grad" in them that switch autograd on or off, or mark tensors: they read no gradient.
GRAD_MODES = {"no_grad", "enable_grad", "set_grad_enabled", "is_grad_enabled", "requires_grad", "requires_grad_",
              "grad_fn"}
# A probe line before the clearing may call these and still not read gradients.
SAFE_CALLS = {"log", "float", "int", "len", "round", "abs", "min", "max", "sum", "str", "bool", "item", "mean",
              "std", "norm", "detach", "cpu", "numpy", "tolist", "numel", "size", "float", "clone"}


def gradient_words(names) -> set[str]:
    """The names that may read gradients: :data:`READS_GRADS`, and any other with "grad" in it
    (``get_grad_norm``, ``grads``) but :data:`GRAD_MODES`."""
    return {n for n in names if n in READS_GRADS or ("grad" in n.lower() and n not in GRAD_MODES)}


def dynamic(node) -> bool:
    """Whether code reaches names dynamically (``eval(...)``, ``globals()``, ``obj.__dict__``; ``model.eval()``
    is a method, not the builtin)."""
    return any((isinstance(n, ast.Name) and n.id in DYNAMIC) or (isinstance(n, ast.Attribute) and n.attr == "__dict__")
               for n in ast.walk(node))


def words(node, skip=frozenset()) -> set[str]:
    """Names and attribute names a node mentions (``skip``: ids of attribute nodes whose name does not count), and
    the string ``"grad"`` (``operator.attrgetter("grad")``)."""
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute) and id(n) not in skip:
            out.add(n.attr)
        elif isinstance(n, ast.Constant) and n.value == "grad":
            out.add("grad")
    return out


# Libraries whose functions read no gradient, whatever they are given (torch's that do have "grad" in their names:
# clip_grad_norm_, autograd.grad). Another installed library given a module, an optimizer or the parameters may
# (``copy.deepcopy(model)`` copies them; a metrics package may sum their norms behind ``if p.grad is not None``).
TRUSTED_LIBRARIES = {"torch", "numpy", "math", "flor_nb"}


def _mentions(call, holders) -> bool:
    """Whether a call's arguments name a variable in ``holders`` (or an attribute or item of one)."""
    return any(isinstance(n, ast.Name) and n.id in holders
               for a in (*call.args, *(k.value for k in call.keywords)) for n in ast.walk(a))


def may_read_grads(stmt, library_call, forgiven=None) -> bool:
    """``forgiven(call) -> bool``: calls whose method name alone does not count (``scheduler.step()``: the
    recorder judged the object, which is no optimizer)."""
    named = words(stmt)
    if forgiven is not None and gradient_words(named):
        named = words(stmt, skip={id(c.func) for c in ast.walk(stmt) if isinstance(c, ast.Call)
                                  and isinstance(c.func, ast.Attribute) and forgiven(c)})
    if gradient_words(named):
        return True
    for call in (n for n in ast.walk(stmt) if isinstance(n, ast.Call)):
        if library_call is not None:
            if not library_call(call):
                return True
        elif _call_name(call) not in SAFE_CALLS:
            return True
    return False


def _call_name(call) -> str | None:
    f = call.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None


def probe_judge(sources, holders=frozenset()):
    """``library_call`` without a namespace, for probe lines: a call cannot read gradients when it calls

    * a function or class of the cells whose code, through the ones it calls, names nothing that reads them;
    * a function of an imported library (trusted, as at record time: but one outside
      :data:`TRUSTED_LIBRARIES` given one of ``holders``, the variables that hold gradients: the recorded
      modules and optimizers, the parameter lists cleared); of a module file beside the notebook, when that file
      names nothing that reads them;
    * a method in :data:`SAFE_METHODS` (``.norm()``, ``.item()``, ``.get_last_lr()``) or of a class of the
      cells judged as above, or a variable itself (``model(x)``), while no class or lambda of the cells
      mentions gradients.

    Anything else may read them: the epochs whose step-exit state lacks them then run their step loop."""
    defs: dict = {}
    others, imports = [], {}
    for src in sources:
        try:
            tree = ast.parse(src)
        except SyntaxError:
            return lambda call: False
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defs.setdefault(node.name, []).append(node)
            elif isinstance(node, ast.Lambda):
                others.append(node)
            elif isinstance(node, ast.Import):
                imports.update({(a.asname or a.name).split(".")[0]: a.name for a in node.names})
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imports.update({a.asname or a.name: node.module for a in node.names})

    def risky(node) -> bool:
        return bool(gradient_words(words(node))) or dynamic(node)

    tainted = {name for name, nodes in defs.items() if any(risky(n) for n in nodes)}
    grew = True
    while grew:  # a function calling a tainted one is tainted
        more = {name for name, nodes in defs.items() if name not in tainted and any(words(n) & tainted for n in nodes)}
        tainted |= more
        grew = bool(more)
    objects_tainted = (any(risky(n) or words(n) & tainted for n in others)
                       or any(isinstance(n, ast.ClassDef) for name in tainted for n in defs[name]))
    methods = {m.name for nodes in defs.values() for n in nodes if isinstance(n, ast.ClassDef) for m in n.body
               if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))}

    def judge(call) -> bool:
        f = call.func
        while isinstance(f, (ast.Attribute, ast.Subscript)):
            f = f.value
        if isinstance(f, ast.Call) and not judge(f):
            return False
        if isinstance(f, ast.Constant) and isinstance(f.value, str):  # "{:.4f}".format(loss): a str method
            return True
        if not isinstance(f, (ast.Name, ast.Call)):
            return False
        root = f.id if isinstance(f, ast.Name) else None
        if root in defs:
            return root not in tainted and (not isinstance(call.func, ast.Attribute) or not objects_tainted)
        if root in imports:
            trusted = imports[root].split(".")[0] in TRUSTED_LIBRARIES
            return _module_reads_nothing(imports[root]) and (trusted or not _mentions(call, holders))
        if isinstance(call.func, ast.Attribute):  # a method of some object
            name = call.func.attr
            return not objects_tainted and (name in SAFE_METHODS or name in methods)
        return not objects_tainted  # a builtin, or a variable called (a module's forward)

    return judge


SAFE_METHODS = {
    "item", "tolist", "numpy", "cpu", "detach", "clone", "float", "double", "half", "int", "long", "bool", "to", "type",
    "mean", "std", "var", "sum", "prod", "norm", "abs", "max", "min", "argmax", "argmin", "amax", "amin", "median",
    "view", "reshape", "flatten", "size", "numel", "dim", "eq", "ne", "gt", "lt", "ge", "le", "all", "any", "isnan",
    "isfinite", "sqrt", "exp", "log", "log10", "pow", "square", "softmax", "log_softmax", "topk", "sort", "unsqueeze",
    "squeeze", "t", "nonzero", "count_nonzero", "round", "clamp", "add", "sub", "mul", "div", "matmul", "dot",
    "parameters", "buffers", "named_buffers", "modules", "named_modules", "children", "state_dict", "eval", "train",
    "get_last_lr", "get", "keys", "values", "items", "append", "copy", "index", "count", "format", "join",
}


def _module_reads_nothing(module: str) -> bool:
    """An imported module: an installed library or the standard library (trusted, as at record time), or the
    user's own code (a file beside the notebook, a folder on ``sys.path``), trusted only when it names nothing
    that reads gradients."""
    import importlib.util
    import os
    import pathlib
    import sysconfig

    top = module.split(".")[0]
    if top == "flor_nb":
        return True
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    origin = getattr(spec, "origin", None)
    if not origin or not os.path.isfile(origin):
        return spec is not None and origin in ("built-in", "frozen")
    installed = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    where = os.path.realpath(origin)
    if any(where.startswith(p + os.sep) for p in installed) or "site-packages" in where:
        return True
    folder = os.path.dirname(origin) if origin.endswith("__init__.py") else None
    files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".py")] if folder else [origin]
    try:
        return not any(gradient_words(words(ast.parse(pathlib.Path(f).read_text(encoding="utf8")))) for f in files)
    except (OSError, SyntaxError, ValueError):
        return False


def record_judge(ns: dict, depth: int = 3):
    """``library_call(call)``: True when the call cannot read gradients: torch, numpy and builtins, methods
    of tensors and arrays, and functions or modules of the notebook whose code (followed ``depth`` calls
    deep) names nothing that reads gradients."""
    import types

    import numpy as np
    import torch

    user = ns.get("__name__", "__main__")
    judging: set = set()  # ids of the functions and classes being judged further up: a cycle adds nothing

    def safe(obj, d) -> bool:
        if isinstance(obj, (torch.Tensor, np.ndarray, types.ModuleType, types.BuiltinFunctionType,
                            int, float, str)):
            return getattr(obj, "__name__", "") != user
        if isinstance(obj, types.MethodType):
            return safe(obj.__func__, d)
        if isinstance(obj, (types.FunctionType, type)) and id(obj) in judging:
            return True  # super(Net, self).__init__() in Net's own code: Net is being judged already
        if isinstance(obj, types.FunctionType):
            if obj.__module__ != user:
                return True
            judging.add(id(obj))
            try:
                return d > 0 and _code_safe(obj.__code__, obj.__globals__, d)
            finally:
                judging.discard(id(obj))
        if isinstance(obj, type):
            if obj.__module__ != user:
                return True
            judging.add(id(obj))
            try:
                return d > 0 and all(_code_safe(f.__code__, getattr(f, "__globals__", ns), d)
                                     for f in vars(obj).values() if isinstance(f, types.FunctionType))
            finally:
                judging.discard(id(obj))
        cls = type(obj)
        if cls.__module__ != user:  # an instance of a library class (nn.Linear, a tensor view)
            return not isinstance(obj, torch.optim.Optimizer)
        return safe(cls, d)

    def _code_safe(code, globs, d) -> bool:
        names = set(code.co_names)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                names |= set(const.co_names)
        if gradient_words(names) or _loaded_globals(code) & DYNAMIC or "__dict__" in names:
            return False
        return all(safe(globs[n], d - 1) for n in names if n in globs and _is_user(globs[n]))

    def _is_user(obj) -> bool:
        mod = getattr(obj, "__module__", None) or getattr(type(obj), "__module__", None)
        return mod == user and not isinstance(obj, (int, float, str, bool, type(None)))

    def holds(name) -> bool:  # a variable that holds gradients: a module, an optimizer, parameters
        v = ns.get(name)
        if isinstance(v, (list, tuple)) and v:
            v = v[0]
        return isinstance(v, (torch.nn.Module, torch.optim.Optimizer)) or (
            isinstance(v, torch.Tensor) and v.requires_grad)

    def given_gradients(call, fn) -> bool:
        """A library outside TRUSTED_LIBRARIES (``copy.deepcopy``) given a variable that holds gradients."""
        if fn is None:
            return False
        module = getattr(fn, "__module__", None) or type(fn).__module__ or ""
        if module == user or module.split(".")[0] in (*TRUSTED_LIBRARIES, "builtins"):
            return False
        names = {n.id for a in (*call.args, *(k.value for k in call.keywords)) for n in ast.walk(a)
                 if isinstance(n, ast.Name)}
        return any(holds(n) for n in names)

    def library_call(call) -> bool:
        f = call.func
        while isinstance(f, ast.Attribute):
            f = f.value
        if isinstance(f, ast.Call):
            return library_call(f)
        if isinstance(f, ast.Constant) and isinstance(f.value, str):  # "{:.4f}".format(loss): a str method
            return True
        if not isinstance(f, ast.Name):
            return False
        obj = ns.get(f.id, __builtins__.get(f.id) if isinstance(__builtins__, dict) else getattr(__builtins__, f.id, None))
        if obj is None:
            return False
        if isinstance(call.func, ast.Attribute):
            target = obj
            for attr in _attr_chain(call.func)[:-1]:
                target = getattr(target, attr, None)
                if target is None:
                    return False
            if isinstance(target, (torch.Tensor, np.ndarray)):
                return True
            if isinstance(target, torch.optim.Optimizer):  # its methods (step) read the gradients
                return False
            meth = getattr(target, _attr_chain(call.func)[-1], None)
            if isinstance(target, types.ModuleType):
                return getattr(target, "__name__", "") != user and not given_gradients(call, meth)
            return meth is not None and safe(meth, depth) and not given_gradients(call, meth)
        return safe(obj, depth) and not given_gradients(call, obj)

    return library_call


def _loaded_globals(code) -> set[str]:
    """Global and builtin names a code object (and the code nested in it) loads: ``eval`` the builtin, not the
    method ``model.eval``, which ``co_names`` lists too."""
    import dis
    import types

    out = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out |= _loaded_globals(const)
    return out


def _attr_chain(node) -> list[str]:
    out = []
    while isinstance(node, ast.Attribute):
        out.append(node.attr)
        node = node.value
    return out[::-1]
