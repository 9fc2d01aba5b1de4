"""Public training code, kept verbatim except for data and size, recorded in a real kernel and replayed in a
fresh one, with probe values compared to a run that had the probes from the start.

Public code stays out of this repository: each test reads it from a checkout named by an environment variable
and is skipped without one (fetch the repositories and point the variables at them):

* ``FLOR_MAKEMORE``: karpathy/makemore (``makemore.py``, ``names.txt``). Its ``while True`` loop draws batches
  from an ``InfiniteDataLoader`` with 4 worker processes, an iterator kept across iterations.
* ``FLOR_MINGPT``: karpathy/minGPT (``mingpt/``, ``demo.ipynb``). Its loop is inside ``Trainer.run()``; the demo's
  dataset splits by ``hash()``; the trainer keeps wall-clock attributes.
* ``FLOR_PYTORCH_EXAMPLES``: pytorch/examples (``word_language_model/``). An LSTM (weak references to its own
  parameters), ``for epoch in range(1, args.epochs+1)`` inside ``try``, the learning rate annealed in a global,
  the model saved to a file when it improves, the batch loop in ``train()``. Also ``mnist/main.py``: the batch
  loop in ``train(args, model, device, train_loader, optimizer, epoch)``, ``scheduler.step()`` in the epoch loop;
  and ``vae/main.py``: ``train(epoch)`` sums ``train_loss`` in its batch loop and prints the average after it.
* ``FLOR_LIGHTNING``: Lightning-AI/pytorch-lightning (``examples/pytorch/basics/autoencoder.py``). ``LightningCLI``
  (needs ``jsonargparse``) builds the trainer with Lightning's defaults: a logger, ``ModelCheckpoint``, the
  example's own ``ImageSampler`` callback saving images at every epoch end.
* ``FLOR_ZERO_TO_HERO``: karpathy/nn-zero-to-hero (``lectures/makemore/makemore_part2_mlp.ipynb``), with
  ``FLOR_MAKEMORE`` for its ``names.txt``. The lecture's notebook: a step-only loop over plain tensors, batches
  from the global torch RNG (never seeded), a dev split read only by the probe, and the training cell run a
  second time to train more, as in the lecture.
* ``FLOR_HF_COURSE``: huggingface/course (``chapters/en/chapter3/3.mdx``, "Fine-tuning a model with the Trainer
  API"): its code blocks in order as notebook cells, a first ``trainer.train()`` before the one recorded, then
  ``compute_metrics`` and a new Trainer with ``eval_strategy="epoch"``. Needs ``datasets``.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import textwrap

import nbformat
import pandas as pd
import pytest

import flor_nb as flor
from test_shapes import execute, text

pytestmark = pytest.mark.slow  # real kernels


def _checkout(var: str, *files: str) -> pathlib.Path:
    root = pathlib.Path(os.environ.get(var, "/nonexistent"))
    if not all((root / f).exists() for f in files):
        pytest.skip(f"set {var} to a checkout holding {', '.join(files)}")
    return root


def _between(src: str, start: str, end: str | None) -> str:
    i = src.index(start)
    return src[i:src.index(end, i)] if end else src[i:]


def _values(frame, names, units=None) -> dict:
    out = {}
    for _, r in frame.iterrows():
        for n in names:
            if n in frame and not pd.isna(r[n]) and (units is None or r["epoch"] in units):
                out[(n, int(r["epoch"]), None if pd.isna(r["step"]) else int(r["step"]), int(r["seq"]))] = r[n]
    return out


def _same_as_from_the_start(pkl, names, store) -> dict:
    got = _values(pd.read_pickle(pkl), names)
    want = _values(flor.dataframe(*names, run="truth", store=store), names, {k[1] for k in got})
    assert got and got == want, {k: (got.get(k), want.get(k)) for k in set(got) | set(want)
                                 if got.get(k) != want.get(k)}
    return got


def _replays_as_recorded_with_the_probe(store, tmp_path, run, probe, code, truth, plan, before=(),
                                        epochs=(2, 3), flag="--epochs") -> str:
    """Replay ``epochs`` (first, last) of ``run`` in a fresh kernel (``before``: cells run there first) with ``code``;
    its verdict is faithful and names ``plan`` (if given), and ``probe``'s values equal those of run ``truth``.
    Returns the verdict."""
    pkl = tmp_path / f"{probe}.pkl"
    fresh = execute(["%load_ext flor_nb", *before,
                     f"%%flor replay {run} {flag} {epochs[0]}-{epochs[1]} --no-progress\n{code}",
                     f"_.to_pickle({str(pkl)!r})"], tmp_path)
    verdict = text(fresh.cells[1 + len(before)])
    said = "\n".join(ln for ln in verdict.splitlines() if "flor_nb" in ln or "eplay" in ln)  # not the frame shown
    assert "Faithful replay" in verdict and (plan is None or plan in verdict), said
    got = _values(pd.read_pickle(pkl), [probe])
    want = _values(flor.dataframe(probe, run=truth, store=store), [probe], set(range(epochs[0], epochs[1] + 1)))
    assert got and got == want, (got, want)
    return verdict


@pytest.mark.timeout(900)
def test_makemore_while_loop_with_an_infinite_dataloader(store, tmp_path):
    pytest.importorskip("tensorboard")  # makemore.py writes TensorBoard summaries
    root = _checkout("FLOR_MAKEMORE", "makemore.py", "names.txt")
    src = (root / "makemore.py").read_text()
    shutil.copy(root / "names.txt", tmp_path / "names.txt")
    defs = _between(src, '"""\nyou give this script', "# ----------------------------------------------------------"
                    "-------------------\nif __name__ == '__main__':")
    main = textwrap.dedent(_between(src, "    # parse command line args", "    # training loop")).replace(
        "args = parser.parse_args()",  # size only: 700 steps of a small transformer
        "args = parser.parse_args(['--max-steps', '700', '--n-layer', '2', '--n-embd', '32', '--n-embd2', '32'])")
    loop = textwrap.dedent(_between(src, "    # training loop", None))
    probed = loop.replace("loss.backward()\n", "loss.backward()\n    flor.log('loss', loss.item())\n", 1)
    assert "batch_loader.next()" in loop and probed != loop

    rec = text(execute(["%load_ext flor_nb", defs, main, "%%flor record --name mm --no-progress\n" + loop],
                       tmp_path).cells[3])
    assert "flor_nb: finished mm@1: 700 iterations" in rec and "Not captured" not in rec, rec[-2000:]
    execute(["%load_ext flor_nb", defs, main, "%%flor record --name truth --no-progress\n" + probed], tmp_path)
    pkl = tmp_path / "replayed.pkl"
    fresh = execute(["%load_ext flor_nb", "%%flor replay mm --iters 600-620 --no-progress\n" + probed,
                     f"_.to_pickle({str(pkl)!r})"], tmp_path)
    verdict = text(fresh.cells[1])
    assert "Faithful replay" in verdict, verdict[-3000:]
    assert len(_same_as_from_the_start(pkl, ["loss"], store)) == 21


@pytest.mark.timeout(900)
def test_zero_to_hero_mlp_notebook_trained_again(store, tmp_path):
    """The lecture trains by running its training cell, then runs it again to train more; that second run is
    recorded. A probe of the dev loss (``Xdev`` is rebuilt by the data cell and checked against the recording's
    digest) replays as in a run that had it from the start."""
    import json

    root = _checkout("FLOR_ZERO_TO_HERO", "lectures/makemore/makemore_part2_mlp.ipynb")
    shutil.copy(_checkout("FLOR_MAKEMORE", "names.txt") / "names.txt", tmp_path / "names.txt")
    nb = json.loads((root / "lectures" / "makemore" / "makemore_part2_mlp.ipynb").read_text())
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    cells = [code[i] for i in (0, 1, 3, 6, 22, 24, 26)]
    assert "random.seed(42)" in cells[3] and "lossi = []" in cells[6]
    train = code[27].replace("range(200000)", "range(1200)")  # size
    assert train != code[27] and "lossi.append(loss.log10().item())" in train
    probed = train.replace("  lossi.append(loss.log10().item())\n", "  lossi.append(loss.log10().item())\n"
                           "  flor.log('dev', F.cross_entropy(torch.tanh(C[Xdev].view(-1, 30) @ W1 + b1) @ W2 + b2, "
                           "Ydev).item())\n")
    assert probed != train
    # The lecture never seeds torch's global RNG, which torch 2.13 seeds at random in each process: the run "with
    # the probe from the start" is another kernel, so both seed it (the replay itself needs no seed).
    first = ["%load_ext flor_nb\nimport torch\ntorch.manual_seed(1)", *cells, train, code[30]]
    rec = text(execute([*first, "%%flor record --name mlp --no-progress\n" + train], tmp_path).cells[-1])
    assert "flor_nb: finished mlp@1: 1200 iterations" in rec and "Not captured" not in rec, rec[-2000:]
    recorded = store.find_run("mlp")
    assert "Xdev" in recorded.state["setup_digests"] and "Xdev" not in recorded.state["roots"]
    execute([*first, "%%flor record --name truth --no-progress\n" + probed], tmp_path)
    verdict = _replays_as_recorded_with_the_probe(store, tmp_path, "mlp", "dev", probed, "truth", None,
                                                  epochs=(900, 930), flag="--iters")
    assert "NOT the recording" not in verdict and "Not compared with the recording" not in verdict, verdict[-2000:]


@pytest.mark.timeout(900)
def test_mingpt_demo_trainer_run(store, tmp_path, monkeypatch):
    root = _checkout("FLOR_MINGPT", "mingpt/trainer.py", "demo.ipynb")
    shutil.copytree(root / "mingpt", tmp_path / "mingpt")
    monkeypatch.setenv("PYTHONHASHSEED", "0")  # its SortDataset splits by hash(): see test_hash_seed.py
    cells = [''.join(c['source']) for c in json.loads((root / "demo.ipynb").read_text())['cells']
             if c['cell_type'] == 'code']
    cells[4] = cells[4].replace("train_config.max_iters = 2000", "train_config.max_iters = 200")  # size
    train = cells[5]
    assert train.rstrip().endswith("trainer.run()")

    refused = execute(["%load_ext flor_nb", *cells[:5], nbformat.v4.new_code_cell(
        "%%flor record --name mingpt\n" + train, metadata={"tags": ["raises-exception"]})], tmp_path)
    said = "\n".join(o.get("evalue", "") + o.get("text", "") for o in refused.cells[-1].outputs)
    assert "inside trainer.run() (Trainer.run, mingpt/trainer.py line" in said, said

    unit = train.replace("trainer.run()", "for _ in flor.loop('epoch', range(1)):\n    trainer.run()")
    probed = unit.replace("    if trainer.iter_num % 100 == 0:\n",
                          "    flor.log('loss', trainer.loss.item())\n    if trainer.iter_num % 100 == 0:\n")
    execute(["%load_ext flor_nb", *cells[:5], "%%flor record --name mingpt --no-progress\n" + unit], tmp_path)
    execute(["%load_ext flor_nb", *cells[:5], "%%flor record --name truth --no-progress\n" + probed], tmp_path)
    pkl = tmp_path / "replayed.pkl"
    fresh = execute(["%load_ext flor_nb", "%%flor replay mingpt --epochs 0 --no-progress\n" + probed,
                     f"_.to_pickle({str(pkl)!r})"], tmp_path)
    verdict = text(fresh.cells[1])
    assert "Faithful replay" in verdict and "attributes iter_dt, iter_time of Trainer objects" in verdict, verdict
    assert len(_same_as_from_the_start(pkl, ["loss"], store)) == 200


@pytest.mark.timeout(900)
def test_word_language_model(store, tmp_path):
    root = _checkout("FLOR_PYTORCH_EXAMPLES", "word_language_model/main.py",
                     "word_language_model/data/wikitext-2/valid.txt")
    wlm = root / "word_language_model"
    src = (wlm / "main.py").read_text()
    for f in ("data.py", "model.py"):
        shutil.copy(wlm / f, tmp_path / f)
    valid = (wlm / "data" / "wikitext-2" / "valid.txt").read_text(encoding="utf8")  # data: a small slice
    (tmp_path / "small").mkdir()
    for name, part in (("train", valid[:60000]), ("valid", valid[60000:72000]), ("test", valid[72000:84000])):
        (tmp_path / "small" / f"{name}.txt").write_text(part, encoding="utf8")
    args = ("['--epochs', '6', '--emsize', '32', '--nhid', '32', '--nlayers', '1', '--bptt', '20', "
            "'--batch_size', '10', '--log-interval', '20', '--data', './small']")
    setup = _between(src, "# coding: utf-8", "##########################################################"
                     "#####################\n# Training code").replace("args = parser.parse_args()",
                                                                      f"args = parser.parse_args({args})")
    funcs = _between(src, "def repackage_hidden", "# Loop over epochs.")
    loop = _between(src, "# Loop over epochs.", "# Load the best saved model.")
    step = "        total_loss += loss.item()\n"
    funcs_probed = funcs.replace(step, step + "        flor.log('loss', loss.item())\n")
    loop_probed = loop.replace("        val_loss = evaluate(val_data)\n",
                               "        val_loss = evaluate(val_data)\n        flor.log('lr', lr)\n")
    assert funcs_probed != funcs and loop_probed != loop

    rec = text(execute(["%load_ext flor_nb", setup, funcs, "%%flor record --name wlm --no-progress\n" + loop],
                       tmp_path).cells[3])
    assert "6 epochs" in rec and "`epoch` = 1-6 in the loop" in rec and "Not captured" not in rec, rec[-2000:]
    execute(["%load_ext flor_nb", setup, funcs_probed, "%%flor record --name truth --no-progress\n" + loop_probed],
            tmp_path)
    pkl = tmp_path / "replayed.pkl"
    fresh = execute(["%load_ext flor_nb", funcs_probed,  # the helper edited in the fresh kernel
                     "%%flor replay wlm --epochs 3-4 --no-progress\n" + loop_probed, f"_.to_pickle({str(pkl)!r})"],
                    tmp_path)
    verdict = text(fresh.cells[2])
    assert "Faithful replay" in verdict and "where `epoch` = 4-5" in verdict, verdict[-3000:]
    assert "model.pt" in verdict  # the file its loop saves is named as written by the replay
    got = _same_as_from_the_start(pkl, ["loss", "lr"], store)
    assert {k[1] for k in got} == {3, 4}


@pytest.mark.timeout(900)
def test_cifar10_tutorial_leaves_the_gradients_out(store, tmp_path):
    """``FLOR_PYTORCH_TUTORIALS``: pytorch/tutorials (``beginner_source/blitz/cifar10_tutorial.py``). Its epoch loop
    calls ``optimizer.zero_grad()`` first in the batch loop, so checkpoints leave the gradients and the last batch
    out; a probe after the batch loop that reads them makes those epochs run their batch loop, one that does not
    skips it."""
    root = _checkout("FLOR_PYTORCH_TUTORIALS", "beginner_source/blitz/cifar10_tutorial.py")
    src = (root / "beginner_source" / "blitz" / "cifar10_tutorial.py").read_text()
    data = textwrap.dedent("""\
        import torch
        torch.manual_seed(0)  # data: random images instead of CIFAR10 (no download); the loader as written
        trainset = torch.utils.data.TensorDataset(torch.randn(480, 3, 32, 32).clamp(-1, 1), torch.randint(0, 10, (480,)))
        trainloader = torch.utils.data.DataLoader(trainset, batch_size=4, shuffle=True, num_workers=2)
        """)
    net = _between(src, "import torch.nn as nn", "#####")
    opt = _between(src, "import torch.optim as optim", "#####")
    loop = _between(src, "for epoch in range(2):", "print('Finished Training')")
    loop = loop.replace("range(2)", "range(5)").replace("2000", "40").replace("1999", "39")  # size
    after = "            running_loss = 0.0\n"
    assert loop.endswith(after + "\n")
    weight = loop + "    flor.log('fc3', float(net.fc3.weight.detach().norm()))\n"
    grad = loop + "    flor.log('fc3_grad', float(net.fc3.weight.grad.norm()))\n"
    batch = loop + "    flor.log('last_inputs', float(inputs.sum()))\n"
    cells = ["%load_ext flor_nb", data, net, opt]
    execute([*cells, "%%flor record --name cifar --overhead inf --no-progress\n" + loop], tmp_path)
    recorded = store.find_run("cifar")
    dead = recorded.state["dead"]
    assert dead["steps"] and {"inputs", "outputs", "loss"} <= set(dead["names"]) and recorded.state["omitting_steps"]
    for name, code in (("truth_w", weight), ("truth_g", grad), ("truth_b", batch)):
        execute([*cells, f"%%flor record --name {name} --no-progress\n" + code], tmp_path)
    for probe, code, truth, plan in (("fc3", weight, "truth_w", "with the step loop skipped"),
                                     ("fc3_grad", grad, "truth_g", "run their step loop"),
                                     ("last_inputs", batch, "truth_b", "run their step loop")):
        _replays_as_recorded_with_the_probe(store, tmp_path, "cifar", probe, code, truth, plan)


@pytest.mark.timeout(900)
def test_mnist_example_leaves_the_gradients_its_train_helper_clears_out(store, tmp_path):
    """pytorch/examples' ``mnist/main.py``: ``train()`` calls ``optimizer.zero_grad()`` first in its batch loop, so
    the checkpoints leave the gradients out (a third of an Adadelta checkpoint); a probe after ``train()`` that
    reads them makes those epochs run the batch loop, one that does not skips it, and a probe added inside the
    helper in the fresh kernel runs it everywhere."""
    root = _checkout("FLOR_PYTORCH_EXAMPLES", "mnist/main.py")
    src = (root / "mnist" / "main.py").read_text()
    imports = _between(src, "import argparse", "class Net").replace("from torchvision import datasets, transforms\n",
                                                                   "")
    net = _between(src, "class Net", "def train(")
    helpers = _between(src, "def train(", "def main():")
    setup = textwrap.dedent(_between(src, "    # Training settings", "    for epoch in range(1, args.epochs + 1):"))
    setup = setup.replace("args = parser.parse_args()",  # size
                          "args = parser.parse_args(['--epochs', '5', '--batch-size', '32', '--log-interval', '5'])")
    data = _between(setup, "transform=transforms.Compose", "train_loader = torch")
    setup = setup.replace(data, textwrap.dedent("""\
        # data: random images instead of MNIST (no download)
        dataset1 = torch.utils.data.TensorDataset(torch.randn(320, 1, 28, 28), torch.randint(0, 10, (320,)))
        dataset2 = torch.utils.data.TensorDataset(torch.randn(200, 1, 28, 28), torch.randint(0, 10, (200,)))
        """))
    loop = textwrap.dedent(_between(src, "    for epoch in range(1, args.epochs + 1):", "\n    if args.save_model"))
    weight = loop + "    flor.log('fc2', float(model.fc2.weight.detach().norm()))\n"
    grad = loop + "    flor.log('fc2_grad', float(model.fc2.weight.grad.norm()))\n"
    step = "        optimizer.step()\n"
    helpers_probed = helpers.replace(step, step + "        flor.log('loss', loss.item())\n")
    assert helpers_probed != helpers
    cells = ["%load_ext flor_nb", imports, net, helpers, setup]
    rec = text(execute([*cells, "%%flor record --name mnist --overhead inf --no-progress\n" + loop],
                       tmp_path).cells[5])
    assert "5 epochs" in rec and "Not captured" not in rec, rec[-2000:]
    recorded = store.find_run("mnist")
    assert recorded.state["loops"]["helper"]["name"] == "train"
    assert recorded.state["dead"] == {"names": [], "cleared": [["zero_grad", "optimizer"]], "clear_line": 5,
                                      "steps": True}
    assert recorded.state["omitting_steps"] == recorded.state["omitting"] == [0, 1, 2, 3]  # 4, the last, keeps all
    for name, code, cells_run in (("truth_w", weight, cells), ("truth_g", grad, cells),
                                  ("truth_l", loop, [*cells[:3], helpers_probed, setup])):
        execute([*cells_run, f"%%flor record --name {name} --no-progress\n" + code], tmp_path)
    for probe, code, truth, plan, before in (
            ("fc2", weight, "truth_w", "with the step loop skipped", []),
            ("fc2_grad", grad, "truth_g", "run their step loop", []),
            ("loss", loop, "truth_l", "2 epoch(s) in full", [helpers_probed])):  # the helper edited in the fresh kernel
        verdict = _replays_as_recorded_with_the_probe(store, tmp_path, "mnist", probe, code, truth, plan, before)
        assert "kept everything" not in verdict, verdict[-3000:]  # entered from the checkpoints without gradients


@pytest.mark.timeout(900)
def test_mnist_example_with_probes_before_and_after_its_epoch_loop(store, tmp_path):
    """pytorch/examples' ``mnist/main.py`` recorded with the code after its epoch loop (``if args.save_model:``),
    verbatim. In a fresh kernel, a replay of epoch 1 with a probe before the loop (the initial weights) and one
    after it (the final test loss) runs epoch 0 and the last epoch too, and both values equal those of a run that
    had the probes from the start. Before, both probes logged nothing, without a word."""
    root = _checkout("FLOR_PYTORCH_EXAMPLES", "mnist/main.py")
    src = (root / "mnist" / "main.py").read_text()
    imports = _between(src, "import argparse", "class Net").replace("from torchvision import datasets, transforms\n",
                                                                   "")
    setup = textwrap.dedent(_between(src, "    # Training settings", "    for epoch in range(1, args.epochs + 1):"))
    setup = setup.replace("args = parser.parse_args()",  # size
                          "args = parser.parse_args(['--epochs', '3', '--batch-size', '32', '--log-interval', '5'])")
    setup = setup.replace(_between(setup, "transform=transforms.Compose", "train_loader = torch"), textwrap.dedent("""\
        # data: random images instead of MNIST (no download)
        dataset1 = torch.utils.data.TensorDataset(torch.randn(320, 1, 28, 28), torch.randint(0, 10, (320,)))
        dataset2 = torch.utils.data.TensorDataset(torch.randn(200, 1, 28, 28), torch.randint(0, 10, (200,)))
        """))
    code = textwrap.dedent(_between(src, "    for epoch in range(1, args.epochs + 1):", "\n\nif __name__"))
    assert "if args.save_model:" in code
    probed = ("flor.log('fc2_init', float(model.fc2.weight.detach().norm()))\n" + code +
              "with torch.no_grad():\n"
              "    flor.log('final_nll', float(sum(F.nll_loss(model(x), t, reduction='sum') for x, t in test_loader)))\n")
    cells = ["%load_ext flor_nb", imports, _between(src, "class Net", "def train("),
             _between(src, "def train(", "def main():"), setup]
    execute([*cells, "%%flor record --name mnist_ends --no-progress\n" + code], tmp_path)
    execute([*cells, "%%flor record --name truth_ends --no-progress\n" + probed], tmp_path)
    pkl = tmp_path / "ends.pkl"
    fresh = execute(["%load_ext flor_nb", f"%%flor replay mnist_ends --epochs 1 --no-progress\n{probed}",
                     f"_.to_pickle({str(pkl)!r})"], tmp_path)
    verdict = text(fresh.cells[1])
    assert "Faithful replay" in verdict and "so the replay runs epoch 0 too" in verdict \
        and "so the replay runs epoch 2 too" in verdict, verdict[-3000:]
    got = pd.read_pickle(pkl)
    got = got[got["epoch"].isna()]
    want = flor.dataframe("fc2_init", "final_nll", run="truth_ends", store=store)
    want = want[want["epoch"].isna()]
    for name in ("fc2_init", "final_nll"):
        assert got[name].dropna().tolist() == want[name].dropna().tolist() and len(want[name].dropna()) == 1, name


@pytest.mark.timeout(900)
def test_vae_example_keeps_what_its_train_helper_reads_after_the_batch_loop(store, tmp_path):
    """pytorch/examples' ``vae/main.py``: ``train(epoch)`` prints ``train_loss / len(...)`` after its batch loop. The
    recording keeps ``train_loss`` with the batch loop's exit state, so a probe outside the helper still skips the
    batch loop (which its code after the loop needs: tests/test_helper_locals.py checks the values), and leaves
    out the gradients it clears first. A test-loss probe, which draws from torch's global RNG, replays faithfully
    with the values of a run that had it from the start inside ``torch.random.fork_rng()``. Data: random images; ``save_image`` (torchvision, not installable here)
    stands in as ``torch.save``."""
    root = _checkout("FLOR_PYTORCH_EXAMPLES", "vae/main.py")
    src = (root / "vae" / "main.py").read_text()
    head = _between(src, "from __future__ import print_function", "class VAE").replace(
        "from torchvision import datasets, transforms\n", "").replace(
        "from torchvision.utils import save_image\n",
        "def save_image(t, path, nrow=8):  # stands in for torchvision's\n    torch.save(t, path)\n")
    head = head.replace("args = parser.parse_args()",  # size
                        "args = parser.parse_args(['--epochs', '5', '--batch-size', '32', '--log-interval', '100'])")
    head = head.replace(_between(head, "train_loader = torch.utils.data.DataLoader(", "\n\n\n"), textwrap.dedent("""\
        train_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(  # data: random images
            torch.rand(256, 1, 28, 28), torch.zeros(256)), batch_size=args.batch_size, shuffle=True, **kwargs)
        test_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
            torch.rand(64, 1, 28, 28), torch.zeros(64)), batch_size=args.batch_size, shuffle=False, **kwargs)"""))
    (tmp_path / "results").mkdir()
    model = _between(src, "class VAE", "def train(epoch):")
    helpers = _between(src, "def train(epoch):", 'if __name__ == "__main__":')
    loop = textwrap.dedent(src[src.index("    for epoch in range(1, args.epochs + 1):"):])
    weight = loop + "    flor.log('fc4', float(model.fc4.weight.detach().norm()))\n"
    # The probe users write most: the test loss, through the model's forward, which samples (reparameterize), over
    # a DataLoader, whose iterator draws a seed: both from torch's global RNG, which the recorded training reads.
    test_loss = ("    with torch.no_grad():\n"
                 "        flor.log('test_bce', float(sum(loss_function(r, x, mu, lv) for x, _ in test_loader\n"
                 "                                       for r, mu, lv in [model(x)])))\n")
    sampled = loop + test_loss
    sampled_truth = loop + "    with torch.random.fork_rng():\n" + textwrap.indent(test_loss, "    ")
    tail = "    print('====> Epoch: {} Average loss"
    helpers_probed = helpers.replace(tail, "    flor.log('avg', train_loss / len(train_loader.dataset))\n" + tail)
    assert helpers_probed != helpers
    cells = ["%load_ext flor_nb", head, model, helpers]
    rec = text(execute([*cells, "%%flor record --name vae --overhead inf --no-progress\n" + loop], tmp_path).cells[4])
    assert "5 epochs" in rec and "will not be able to rebuild" not in rec, rec[-3000:]  # super(VAE, self): bound
    recorded = store.find_run("vae")
    assert recorded.state["loops"]["helper"]["carry"] == ["train_loss"]
    assert recorded.state["dead"]["cleared"] == [["zero_grad", "optimizer"]] and recorded.state["omitting_steps"]
    for name, code, cells_run in (("truth_w", weight, cells), ("truth_a", loop, [*cells[:3], helpers_probed]),
                                  ("truth_s", sampled_truth, cells)):
        execute([*cells_run, f"%%flor record --name {name} --no-progress\n" + code], tmp_path)
    for probe, code, truth, plan, before in (
            ("fc4", weight, "truth_w", "2 with the step loop skipped", []),
            ("avg", loop, "truth_a", "2 epoch(s) in full", [helpers_probed]),  # the helper edited in the fresh kernel
            ("test_bce", sampled, "truth_s", None, [])):  # its draws undone after it, as fork_rng does in the truth
        _replays_as_recorded_with_the_probe(store, tmp_path, "vae", probe, code, truth, plan, before)



@pytest.mark.timeout(900)
def test_lightning_autoencoder_example_through_its_cli(store, tmp_path):
    """Lightning's ``examples/pytorch/basics/autoencoder.py``: the trainer comes from ``LightningCLI`` (its parser,
    kept in the state, holds tuples of ABCMeta classes: the replay once failed restoring them), with Lightning's
    default logger and checkpointing and a callback that writes images each epoch. A probe added in
    ``_common_step`` in a fresh kernel reproduces the values of a run that had it from the start, and the verdict
    names the image files the replay wrote again. Data: random images; torchvision (not installable here) is
    replaced by stand-ins for ``transforms.ToTensor``, ``make_grid`` and ``save_image`` (``torch.save``)."""
    pytest.importorskip("jsonargparse", reason="LightningCLI needs jsonargparse")
    root = _checkout("FLOR_LIGHTNING", "examples/pytorch/basics/autoencoder.py")
    src = (root / "examples" / "pytorch" / "basics" / "autoencoder.py").read_text()
    imports = _between(src, "from os import path", "DATASETS_PATH")
    data = textwrap.dedent("""\
        # data: random images instead of MNIST (no download); torchvision stand-ins
        import types
        DATASETS_PATH = "Datasets"
        _TORCHVISION_AVAILABLE = True
        transforms = types.SimpleNamespace(ToTensor=lambda: None)
        torchvision = types.SimpleNamespace(utils=types.SimpleNamespace(make_grid=lambda tensor, **kw: tensor))
        save_image = lambda t, f: torch.save(t, f)
        def MNIST(root, train=True, download=False, transform=None):
            g = torch.Generator().manual_seed(0 if train else 1)
            n = 1200 if train else 200
            return torch.utils.data.TensorDataset(torch.rand(n, 1, 28, 28, generator=g),
                                                  torch.randint(0, 10, (n,), generator=g))
        """)
    sampler = _between(src, "class ImageSampler", "class LitAutoEncoder")
    module = _between(src, "class LitAutoEncoder", "class MyDataModule")
    datamodule = _between(src, "class MyDataModule", "def cli_main").replace("[55000, 5000]", "[1100, 100]")  # size
    cli = textwrap.dedent(_between(src, "    cli = LightningCLI(", "    cli.trainer.fit")).replace(
        'save_config_kwargs={"overwrite": True},',
        'save_config_kwargs={"overwrite": True},\n    args=["--trainer.max_epochs=5"],  # size; not the kernel\'s argv')
    fit = "cli.trainer.fit(cli.model, datamodule=cli.datamodule)\n"
    step = "        loss = F.mse_loss(x, self(x))\n"
    probed = module.replace(step, step + '        flor.log("zn", self.encoder(x).detach().norm().item())\n')
    assert "[1100, 100]" in datamodule and "args=" in cli and probed != module
    cells = ["%load_ext flor_nb", imports, data, sampler, module, datamodule, cli]
    rec = text(execute([*cells, "%%flor record --name ae --no-progress\n" + fit,
                        'print(cli.trainer.test(ckpt_path="best", datamodule=cli.datamodule))'], tmp_path).cells[7])
    assert "finished ae@1: 5 epochs" in rec and "Not captured" not in rec, rec[-3000:]
    execute([*cells[:4], probed, *cells[5:], "%%flor record --name truth --no-progress\n" + fit], tmp_path)
    verdict = _replays_as_recorded_with_the_probe(store, tmp_path, "ae", "zn", fit, "truth", "in full",
                                                  [*cells[1:4], probed])
    assert f"wrote {tmp_path / 'grid_generated_1.png'}" in verdict, verdict[-3000:]


def _mdx_blocks(path: pathlib.Path) -> list[str]:
    """The ``py`` code blocks of a course page, in order."""
    blocks, block = [], None
    for line in path.read_text().splitlines(keepends=True):
        if block is None and line.strip() == "```py":
            block = []
        elif block is not None and line.startswith("```"):
            blocks.append("".join(block))
            block = None
        elif block is not None:
            block.append(line)
    return blocks


@pytest.mark.timeout(900)
def test_hf_course_trainer_api_chapter(store, tmp_path):
    """The HF course's Trainer chapter, block by block as a notebook runs it: a first ``trainer.train()``, a
    prediction and a metric, then ``compute_metrics`` and a new Trainer evaluated every epoch, whose
    ``trainer.train()`` is recorded. Probes: one added to ``compute_metrics`` by re-running its cell alone in a
    fresh kernel, and a ``TrainerCallback`` added in the replayed cell; both equal a run that had them from the
    start. Data: random sentence pairs and a word-level tokenizer; a small BERT from a config instead of
    ``from_pretrained``; the GLUE metric (downloaded by ``evaluate``) computed in numpy."""
    pytest.importorskip("datasets", reason="the course's data cell needs datasets")
    root = _checkout("FLOR_HF_COURSE", "chapters/en/chapter3/3.mdx")
    blocks = _mdx_blocks(root / "chapters" / "en" / "chapter3" / "3.mdx")[:11]
    assert blocks[4] == blocks[10] == "trainer.train()\n" and "def compute_metrics" in blocks[8], blocks
    stand_in = textwrap.dedent("""\
        # data: random sentence pairs and a word-level vocabulary; a small BERT; GLUE's metric in numpy (no download)
        import random, tempfile, types, datasets, numpy as np, torch
        torch.manual_seed(0)  # the run with the probes from the start must train the same model
        words = [f"w{i}" for i in range(100)]
        rnd = random.Random(0)
        def pairs(n):
            s = lambda: " ".join(rnd.choice(words) for _ in range(rnd.randint(5, 15)))
            return {"sentence1": [s() for _ in range(n)], "sentence2": [s() for _ in range(n)],
                    "label": [rnd.randint(0, 1) for _ in range(n)], "idx": list(range(n))}
        glue_mrpc = datasets.DatasetDict({k: datasets.Dataset.from_dict(pairs(n)) for k, n in
                                          (("train", 96), ("validation", 32), ("test", 32))})
        vocab = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
        vocab.write("\\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
        vocab.close()
        from transformers import BertConfig, BertTokenizerFast
        small_bert = BertConfig(vocab_size=105, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, num_labels=2)
        evaluate = types.SimpleNamespace(load=lambda *a: types.SimpleNamespace(
            compute=lambda predictions, references: {"accuracy": float((predictions == references).mean())}))
        """)
    swaps = {'raw_datasets = load_dataset("glue", "mrpc")': "raw_datasets = glue_mrpc",
             "tokenizer = AutoTokenizer.from_pretrained(checkpoint)": "tokenizer = BertTokenizerFast(vocab.name)",
             "AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=2)":
                 "AutoModelForSequenceClassification.from_config(small_bert)",
             "import evaluate\n": ""}
    cells = []
    for block in blocks[:10]:
        for old, new in swaps.items():
            block = block.replace(old, new)
        cells.append(block)
    assert "glue_mrpc" in cells[0] and "small_bert" in cells[2] and "small_bert" in cells[9]
    line = "    predictions = np.argmax(logits, axis=-1)\n"
    metrics = cells[8].replace(line, line + "    flor.log('pos_rate', float((predictions == 1).mean()))\n")
    callback = textwrap.dedent("""\
        from transformers import TrainerCallback
        class Norms(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                flor.log("wn", model.classifier.weight.norm().item())
        trainer.add_callback(Norms())
        """)
    train = blocks[10]
    assert metrics != cells[8]
    rec = text(execute(["%load_ext flor_nb", stand_in, *cells, "%%flor record --name course --no-progress\n" + train],
                       tmp_path).cells[12])
    assert "finished course@1: 3 epochs" in rec and "Not captured" not in rec, rec[-3000:]
    assert "will not be able to rebuild" not in rec, rec[-3000:]  # pairs, used by a comprehension of its own cell
    deps = [c["source"] for c in store.find_run("course").deps]
    assert any("trainer.predict(" in d for d in deps) and "trainer.train()\n" not in deps  # the first training
    execute(["%load_ext flor_nb", stand_in, *cells[:8], metrics, cells[9],
             "%%flor record --name truth --no-progress\n" + callback + train], tmp_path)
    for probe, before, code in (("pos_rate", [metrics], train), ("wn", [], callback + train)):
        _replays_as_recorded_with_the_probe(store, tmp_path, "course", probe, code, "truth", None, before, (1, 2))
