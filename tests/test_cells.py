"""Dependency cells: found from what each cell bound, never the training cells."""
from __future__ import annotations

from flor_nb.cells import Cell, analyze, dependencies, strip_shell
from flor_nb.instrument import instrument


def deps(history, target):
    return [c.count for c in dependencies(history, target)]


def test_reads_before_writes():
    free, bound = analyze("best = 0\nfor e in range(N):\n    acc = f(e)\n    best = max(best, acc)\n    total += 1\n")
    assert free == {"N", "f", "total"}
    assert {"best", "acc", "e", "total"} <= bound


def test_function_globals_count_as_reads():
    free, _ = analyze("def evaluate(m):\n    return acc(m(X_val), y_val)\nflor.log('a', evaluate(model))\n")
    assert {"acc", "X_val", "y_val", "model"} <= free and "m" not in free


def test_global_helper_and_star_import_use_runtime_bindings():
    history = [
        Cell(1, "import torch\n", {"torch"}),
        Cell(2, "from mylib import *\n", {"make_loader"}),  # bound at runtime, invisible in the text
        Cell(3, "def setup():\n    global model\n    model = torch.nn.Linear(2, 2)\n", {"setup"}),
        Cell(4, "setup()\n", {"model"}),
        Cell(5, "loader = make_loader()\n", {"loader"}),
        Cell(6, "unrelated = 1\n", {"unrelated"}),
    ]
    target = "for epoch in range(3):\n    for xb in loader:\n        model(xb)\n"
    assert deps(history, target) == [1, 2, 3, 4, 5]


def test_training_cells_are_never_rerun():
    history = [
        Cell(1, "import torch\nmodel = torch.nn.Linear(2, 2)\nopt = torch.optim.SGD(model.parameters(), 0.1)\n"),
        Cell(2, "model.to('cpu')\n"),  # changes the model outside any loop: needed
        Cell(3, "for epoch in range(100):\n    opt.step()\nmodel.eval()\n"),  # an hour of training: never
        Cell(4, "get_ipython().run_cell_magic('flor', 'record', 'for e in range(2):\\n    pass')\n", {"e"}),
    ]
    target = "for epoch in range(3):\n    opt.step()\n    model.train()\n"
    assert deps(history, target) == [1, 2]


def test_redefinition_uses_the_latest_cell():
    history = [
        Cell(1, "lr = 0.1\n"),
        Cell(2, "lr = 0.01\n"),
    ]
    assert deps(history, "for e in range(2):\n    print(lr)\n") == [2]


def test_strip_shell_drops_magics_only():
    src = "get_ipython().run_line_magic('matplotlib', 'inline')\nx = 1\nfiles = get_ipython().getoutput('ls')\n"
    assert strip_shell(src).strip() == "x = 1"


def test_loops_found_and_explicit_markers():
    _, loops = instrument("h = []\nfor e in range(3):\n    for b in data:\n        pass\n")
    assert (loops.epoch_line, loops.step_line, loops.epoch_explicit) == (2, 3, False)
    _, loops = instrument("with ctx:\n    for e in flor.loop('epoch', range(3)):\n        for _ in range(2):\n"
                          "            for b in flor.loop('step', data):\n                pass\n")
    assert (loops.epoch_line, loops.step_line, loops.epoch_explicit, loops.step_explicit) == (2, 4, True, True)


def test_a_helper_reads_its_globals_when_the_training_cell_calls_it():
    history = [
        Cell(1, "import torch\n"),
        Cell(2, "def train_step(xb):\n    loss = model(xb).sum()\n    loss.backward(); opt.step()\n"),
        Cell(3, "model = torch.nn.Linear(2, 1)\nopt = torch.optim.SGD(model.parameters(), 0.1)\n"),
        Cell(4, "get_ipython().run_cell_magic('flor', 'record', '...')\n", {"history"}),
        Cell(5, "model = torch.nn.Linear(2, 1, bias=False)\nopt = torch.optim.SGD(model.parameters(), 0.1)\n"),
        Cell(6, "def report():\n    return slow_results.mean()\n"),
        Cell(7, "slow_results = run_every_experiment()\n"),  # read only by a helper the cell never calls
    ]
    target = "for epoch in range(3):\n    for xb in data:\n        train_step(xb)\n"
    assert deps(history, target) == [1, 2, 5]  # the model as of the training cell, not the one before the helper
    from flor_nb.cells import resolve

    _, missing = resolve(history, target)
    assert missing == {"data"}


def test_a_class_that_names_itself_is_bound_by_its_own_cell():
    """``super(VAE, self).__init__()`` (pytorch/examples' VAE and MNIST): the cell that defines VAE and calls it
    binds it; the name was reported as missing, with a warning that replay could not rebuild VAE."""
    from flor_nb.cells import resolve

    history = [
        Cell(1, "import torch\n"),
        Cell(2, "class VAE(torch.nn.Module):\n    def __init__(self):\n        super(VAE, self).__init__()\n"
                "        self.fc = torch.nn.Linear(2, 2)\n\nmodel = VAE()\n"),
    ]
    cells, missing = resolve(history, "for epoch in range(3):\n    model(x)\n")
    assert [c.count for c in cells] == [1, 2] and missing == {"x"}


def test_a_comprehension_reading_what_its_own_cell_bound_above_reads_no_earlier_cell():
    """``raw = {k: pairs(n) for ...}`` after ``def pairs`` in the same cell (a data cell feeding the HF course's
    Trainer): ``pairs`` was reported as missing, with a warning that replay could not rebuild it. A name the
    comprehension reads that the cell binds only later, or never, is still read from earlier cells."""
    from flor_nb.cells import resolve

    history = [
        Cell(1, "import random\nwords = ['a', 'b']\n"),
        Cell(2, "def pairs(n):\n    return [random.choice(words) for _ in range(n)]\n"
                "raw = {k: pairs(n) for k, n in (('train', 3),)}\nkeys = sorted(raw, key=lambda k: len(raw[k]))\n"
                "late = [size(v) for v in raw]\nsize = len\n"),
    ]
    cells, missing = resolve(history, "for epoch in range(3):\n    print(raw, keys, late)\n")
    assert [c.count for c in cells] == [1, 2] and missing == {"size"}


def test_an_earlier_training_of_a_framework_trainer_is_never_rerun():
    """The HF course trains once (``trainer.train()``), predicts, then builds a new Trainer whose ``train()`` it
    records: the first training is a mutation of ``trainer`` the prediction reads, and was run again in every
    replay's setup. Given the namespace's trainers, it is a training cell; ``model.train()`` still runs."""
    from flor_nb.cells import resolve

    history = [
        Cell(1, "trainer = Trainer(model)\n"),
        Cell(2, "trainer.train()\n"),
        Cell(3, "model.train()\n"),
        Cell(4, "predictions = trainer.predict(data)\nimport numpy as np\n"),
        Cell(5, "trainer = Trainer(model, metrics=lambda p: np.mean(p))\n"),
    ]
    target = "trainer.train()\n"
    assert [c.count for c in resolve(history, target)[0]] == [1, 2, 3, 4, 5]  # no namespace: as before
    assert [c.count for c in resolve(history, target, {"trainer"})[0]] == [1, 3, 4, 5]


def test_magic_cells_keep_their_body():
    timed = "get_ipython().run_cell_magic('time', '', 'model = torch.nn.Linear(2, 2)\\n')\n"
    captured = "get_ipython().run_cell_magic('capture', 'out --no-stderr', 'import torch\\nX = torch.ones(2)\\n')\n"
    line = "get_ipython().run_line_magic('time', 'opt = torch.optim.SGD(model.parameters(), 0.1)')\n"
    timeit = "get_ipython().run_cell_magic('timeit', '', 'model(X)\\n')\n"
    assert strip_shell(timed).strip() == "model = torch.nn.Linear(2, 2)"
    assert strip_shell(line).strip() == "opt = torch.optim.SGD(model.parameters(), 0.1)"
    assert strip_shell(timeit).strip() == ""  # runs many times in a function: binds nothing, never re-run
    history = [Cell(1, captured, {"X", "torch", "out"}), Cell(2, timed, {"model"}), Cell(3, line, {"opt"}),
               Cell(4, timeit)]
    chosen = dependencies(history, "for e in range(2):\n    opt.step(); model(X)\n")
    assert [c.count for c in chosen] == [1, 2, 3] and "X = torch.ones(2)" in chosen[0].source


def test_strip_shell_keeps_statements_sharing_a_line_once():
    src = "get_ipython().run_line_magic('matplotlib', 'inline')\ntorch.manual_seed(0); X = torch.randn(3)\n"
    assert strip_shell(src).splitlines() == ["", "torch.manual_seed(0); X = torch.randn(3)"]
