"""HF Trainer and Lightning cells: recorded through their callback APIs, replayed from checkpoints.

Real ``Trainer.train()`` / ``Trainer.fit()`` runs on tiny models built from configs (no download).
Each test records a run, records a *truth* run with the probe from the start, and replays chosen
epochs with the probe added to an earlier cell: the probe's values must equal the truth's, bit for bit.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import flor_nb as flor
from flor_nb.errors import NoLoopError

HF_DATA = '''
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed
set_seed(0)
starts = torch.randint(0, 64, (160, 1))
ids = (starts + torch.arange(16)) % 64                 # (160, 16): sequences that count up, mod 64
class Tokens(torch.utils.data.Dataset):
    def __init__(self, ids): self.ids = ids
    def __len__(self): return len(self.ids)
    def __getitem__(self, i): return {"input_ids": self.ids[i], "labels": self.ids[i]}
model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16,
                                   bos_token_id=0, eos_token_id=0))
'''
HF_TRAINER = '''
class LMTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            self.batches = getattr(self, "batches", 0) + 1
        return (loss, outputs) if return_outputs else loss
'''
HF_PROBE = ('        flor.log("logit_norm", outputs.logits.detach().norm().item())\n'
            '        calls.append(model.training)\n'
            '        flor.log("calls", len(calls))\n')
HF_PROBED = "calls = []\n" + HF_TRAINER.replace("        return (loss, outputs)", HF_PROBE + "        return (loss, outputs)")
HF_ARGS = '''
args = TrainingArguments(output_dir="hf-out", num_train_epochs=4, per_device_train_batch_size=32, learning_rate=3e-3,
                         logging_steps=2, eval_strategy="epoch", save_strategy="no", report_to=[], use_cpu=True,
                         disable_tqdm=True, seed=0)
trainer = LMTrainer(model=model, args=args, train_dataset=Tokens(ids[:128]), eval_dataset=Tokens(ids[128:]))
'''

PL_SETUP = '''
import torch, lightning as L
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from sklearn.datasets import load_digits
L.seed_everything(0)
d = load_digits()
X = torch.tensor(d.data, dtype=torch.float32) / 16.0; y = torch.tensor(d.target)
train = DataLoader(TensorDataset(X[:1200], y[:1200]), batch_size=100, shuffle=True)
val = DataLoader(TensorDataset(X[1200:], y[1200:]), batch_size=300)
'''
PL_MODULE = '''
class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(64, 10))
        self.seen = 0
    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.seen += len(x)
        self.log("train_loss", loss)
        return loss
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.net(x).argmax(1) == y).float().mean())
    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=3e-3)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)]
'''
PL_PROBE = ('        flor.log("logit_std", logits.detach().std().item())\n'
            '        calls.append(batch_idx)\n'
            '        flor.log("calls", len(calls))\n')
PL_PROBED = "calls = []\n" + PL_MODULE.replace("        self.log(\"train_loss\", loss)\n",
                                              "        self.log(\"train_loss\", loss)\n" + PL_PROBE)
PL_TRAINER = '''
model = Net()
trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
'''


def _record(cells, code, name, store):
    ns = {"flor": flor, "__name__": "__main__"}
    for src in cells:
        exec(src, ns)
    return flor.record(code, name=name, namespace=ns, cells=cells, store=store, overhead=float("inf"))


def _values(df, name, epochs) -> dict:
    """{(epoch, step or -1, seq): value} of ``name`` in the chosen epochs of a frame."""
    df = df.astype(object).where(df.notna(), None)
    return {(int(r["epoch"]), -1 if r["step"] is None else int(r["step"]), int(r["seq"])): r[name]
            for r in df.to_dict("records") if r["epoch"] in epochs and r.get(name) is not None}


def _truth(store, run, name, epochs) -> dict:
    return _values(flor.dataframe(name, run=run, store=store), name, epochs)


def _calls_named(df):
    """The probes' own counter (``calls``) starts again in each worker, where a run with the probes from the start
    counts on from the epochs before: a segment that starts past epoch 0 says so (probe_state); training is
    checked as faithful all the same."""
    fid, verdict = df.attrs["fidelity"], df.attrs["verdict"]
    if max(t["segment"]["first"] for t in fid["timings"]) > 0:
        assert fid["level"] == "caveats" and fid["probe_changed"]["names"] == {"calls": "changed"}, verdict
        assert "the probes change calls from one epoch to the next" in verdict, verdict
        assert verdict.startswith("Replay reproduced the recorded training, but NOT every value the probes read")
    else:
        assert verdict.startswith("Faithful replay"), verdict


@pytest.mark.timeout(400)
def test_hf_trainer_replays_epochs_with_a_probe_in_compute_loss(store):
    pytest.importorskip("transformers")
    cells = [HF_DATA, HF_TRAINER, HF_ARGS]
    run = _record(cells, "trainer.train()\n", "lm", store)
    assert run.status == "finished" and run.epochs_completed == 4
    assert run.state["loops"]["framework"] == {"kind": "hf", "call": "trainer.train", "nth": 0}
    # The Trainer's state is captured precisely: what it owns on its own, nothing listed as lost.
    objects = run.state["objects"]
    assert objects["trainer"] == "framework" and objects["trainer.optimizer"] == "optimizer"
    assert objects["trainer.lr_scheduler"] == "stateful" and objects["trainer.model"] == "module"
    assert run.state["not_captured"] == {} and run.state["notes"] == {}
    assert sorted(flor.checkpoints("lm", store=store).epoch) == [-1, 0, 1, 2, 3]
    streams = flor.runtime.from_json(store.checkpoints(run.id)[2]["digest"])
    assert "attrs/trainer.batches" in streams  # the subclass's own counter is state (checked, restored)
    # What the Trainer logged is recorded: per logging step, and the evaluation at each epoch end.
    logged = flor.dataframe("train/loss", "train/learning_rate", "train/grad_norm", "eval/loss", run="lm", store=store)
    assert logged["train/loss"].notna().sum() == 8 and logged["train/learning_rate"].notna().sum() == 8
    assert logged["eval/loss"].notna().sum() == 4 and logged[logged["eval/loss"].notna()].step.isna().all()
    assert "eval/runtime" in run.state["clock_metrics"] and "train/train_runtime" in run.state["clock_metrics"]

    _record([HF_DATA, HF_PROBED, HF_ARGS], "trainer.train()\n", "lm-truth", store)
    df = flor.replay("lm", epochs="1,3", cells={2: HF_PROBED}, store=store)
    verdict = df.attrs["verdict"]
    _calls_named(df)
    for metric in ("train/loss", "train/learning_rate", "train/grad_norm", "eval/loss"):
        assert f"{metric} exact" in verdict, verdict
    assert "training state identical to the recording after each replayed epoch" in verdict, verdict
    assert "eval/runtime" in verdict  # named as not compared (wall clock)
    got = _values(df, "logit_norm", {1, 3})
    assert len(got) == 2 * (4 + 4) and got == _truth(store, "lm-truth", "logit_norm", {1, 3})  # steps + eval batches
    # Epoch 3 ran from the checkpoint after epoch 2: in its worker, compute_loss ran only for epoch 3's
    # 4 training steps and its evaluation (4 batches), never for earlier epochs.
    assert _values(df, "calls", {3})[(3, 0, 0)] == 1


@pytest.mark.timeout(400)
def test_lightning_replays_epochs_with_a_probe_in_training_step(store):
    pytest.importorskip("lightning")
    cells = [PL_SETUP, PL_MODULE, PL_TRAINER]
    run = _record(cells, "trainer.fit(model, train, val)\n", "digits", store)
    assert run.status == "finished" and run.epochs_completed == 4
    assert run.state["loops"]["framework"]["kind"] == "lightning"
    objects = run.state["objects"]
    assert objects["model"] == "module" and objects["trainer"] == "framework"
    assert objects["trainer.optimizers[0]"] == "optimizer"
    assert objects["trainer.lr_scheduler_configs[0].scheduler"] == "stateful"
    assert run.state["not_captured"] == {} and run.state["notes"] == {}
    logged = flor.dataframe("train_loss", "val_acc", run="digits", store=store)
    assert logged[logged.step.notna()]["train_loss"].notna().sum() == 4 * 12  # self.log per step
    assert logged[logged.step.isna()]["val_acc"].notna().sum() == 4  # validation, per epoch

    _record([PL_SETUP, PL_PROBED, PL_TRAINER], "trainer.fit(model, train, val)\n", "digits-truth", store)
    df = flor.replay("digits", epochs="0,2", cells={2: PL_PROBED}, store=store)
    verdict = df.attrs["verdict"]
    _calls_named(df)
    assert "train_loss exact (26 values)" in verdict and "val_acc exact (2 values)" in verdict, verdict
    got = _values(df, "logit_std", {0, 2})
    assert len(got) == 2 * 12 and got == _truth(store, "digits-truth", "logit_std", {0, 2})
    assert _values(df, "calls", {2})[(2, 0, 0)] == 1  # epochs 0-1 were not re-run

    # Lightning's own logging works as a probe too: the new metric is new state, not a change.
    logged = PL_MODULE.replace("        self.log(\"train_loss\", loss)\n",
                               "        self.log(\"train_loss\", loss)\n        self.log(\"logit_max\", logits.detach().max())\n")
    df = flor.replay("digits", epochs="1", cells={2: logged}, store=store)
    assert df.attrs["verdict"].startswith("Faithful replay"), df.attrs["verdict"]
    assert df[df.step.notna()]["logit_max"].notna().sum() == 12

    # A probe line of its own that draws random numbers has its draws undone (probe_rng): training is as recorded.
    noisy = PL_MODULE.replace("        self.log(\"train_loss\", loss)\n",
                              "        self.log(\"train_loss\", loss)\n        flor.log(\"noise\", torch.rand(1).item())\n")
    df = flor.replay("digits", epochs="1", cells={2: noisy}, store=store)
    assert df.attrs["verdict"].startswith("Faithful replay"), df.attrs["verdict"]
    assert df[df.step.notna()]["noise"].notna().sum() == 12
    # Drawing on a recorded line it changed does change training: the replay says so, and where.
    changed = PL_MODULE.replace("        self.log(\"train_loss\", loss)\n",
                                "        self.log(\"train_loss\", loss); flor.log(\"noise\", torch.rand(1).item())\n")
    bad = flor.replay("digits", epochs="1", cells={2: changed}, store=store)
    assert bad.attrs["verdict"].startswith("Replay NOT faithful: torch's global RNG differs after epoch 1"), \
        bad.attrs["verdict"]


@pytest.mark.timeout(300)
def test_lightning_failed_fit_keeps_completed_epochs(store):
    pytest.importorskip("lightning")
    failing = PL_MODULE.replace("        self.seen += len(x)\n",
                                "        self.seen += len(x)\n"
                                "        if self.current_epoch == 2 and batch_idx == 5:\n"
                                "            raise RuntimeError('diverged')\n")
    with pytest.raises(RuntimeError, match="diverged"):
        _record([PL_SETUP, failing, PL_TRAINER], "trainer.fit(model, train, val)\n", "fails", store)
    run = flor.get_run("fails", store=store)
    assert run.status == "failed" and run.epochs_completed == 2
    df = flor.replay("fails", epochs="1", store=store)
    assert df.attrs["verdict"].startswith("Faithful replay"), df.attrs["verdict"]


def test_other_fit_calls_are_not_trainers(store):
    """``obj.fit(...)`` on anything but an HF or Lightning Trainer is not a training loop flor_nb can split."""
    class Model:
        def fit(self, x):
            return self
    ns = {"flor": flor, "model": Model()}
    with pytest.raises(NoLoopError, match="no training loop"):
        flor.record("model.fit([1, 2])\n", name="sk", namespace=ns, store=store)


def test_flor_nb_works_without_the_frameworks(tmp_path):
    """Neither framework is imported by flor_nb, and recording works where they cannot be imported."""
    script = textwrap.dedent('''
        import sys
        sys.modules["transformers"] = sys.modules["lightning"] = sys.modules["pytorch_lightning"] = None
        import torch, flor_nb as flor
        ns = {"flor": flor, "torch": torch, "w": torch.zeros(3, requires_grad=True)}
        ns["opt"] = torch.optim.SGD([ns["w"]], lr=0.1)
        code = "for epoch in range(3):\\n    loss = ((w - 1) ** 2).sum()\\n    opt.zero_grad(); loss.backward(); opt.step()\\n    flor.log('loss', loss.item())\\n"
        run = flor.record(code, name="plain", namespace=ns, store=sys.argv[1])
        assert run.epochs_completed == 3, run
        print("ok")
    ''')
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / ".flor")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.timeout(300)
def test_lightning_defaults_logger_checkpoints_early_stopping(store, tmp_path):
    """Lightning's defaults write logs and checkpoints into a new version folder each run: they are outputs,
    so a replay is judged on training state (EarlyStopping's counters included), not on where files went."""
    pytest.importorskip("lightning")
    from flor_nb import presets as probes

    trainer = ('model = Net()\n'
               'trainer = L.Trainer(max_epochs=3, accelerator="cpu", enable_progress_bar=False, num_sanity_val_steps=0,\n'
               '                    callbacks=[L.pytorch.callbacks.EarlyStopping("val_acc", mode="max", patience=5)])\n')
    run = _record([PL_SETUP, PL_MODULE, trainer], "trainer.fit(model, train, val)\n", "defaults", store)
    assert run.status == "finished" and run.epochs_completed == 3
    assert run.state["not_captured"] == {}
    callbacks = [path for path in run.state["objects"] if path.startswith("trainer.callbacks")]
    assert len(callbacks) == 1 and run.state["objects"][callbacks[0]] == "stateful"  # EarlyStopping; not ModelCheckpoint
    recorded = sorted(p.name for p in (tmp_path / "lightning_logs" / "version_0" / "checkpoints").iterdir())
    df = flor.replay("defaults", epochs="1", store=store)
    assert df.attrs["verdict"].startswith("Faithful replay"), df.attrs["verdict"]
    assert sorted(p.name for p in (tmp_path / "lightning_logs" / "version_0" / "checkpoints").iterdir()) == recorded
    with pytest.raises(flor.FlorError, match="trains with `trainer.fit"):
        probes.preset(run, "grad_norm")


PL_BEST = ('class Best(L.Callback):\n'
           '    def on_train_epoch_start(self, trainer, pl_module):\n'
           '        cb = trainer.checkpoint_callback\n'
           '        flor.log("best", None if cb.best_model_score is None else float(cb.best_model_score))\n'
           '        flor.log("top", repr(sorted((os.path.basename(p), float(v)) for p, v in cb.best_k_models.items())))\n'
           'trainer.callbacks.append(Best())\n')


@pytest.mark.timeout(300)
@pytest.mark.parametrize("dirpath", [None, "ckpts"])
def test_lightning_model_checkpoint_knows_the_recorded_best_in_a_replay(store, tmp_path, dirpath):
    """What a ModelCheckpoint knows at an epoch's start (best score, its best k files) is the recording's in a
    replay of that epoch: a probe reading it gets the values of a run that had the probe from the start (it
    got None and [] before, under a faithful verdict), the replay keeps and removes the same files in its own
    folder, and never touches the recording's: with a ``dirpath`` both write to, the replay writes into a new
    folder inside it. The verdict names the checkpoint files the replay wrote (moved into place by fsspec)."""
    pytest.importorskip("lightning")
    def trainer(folder):
        where = "" if folder is None else f"dirpath={folder!r}, "
        return ('import os\nmodel = Net()\n'
                f'ckpt = L.pytorch.callbacks.ModelCheckpoint({where}monitor="val_acc", mode="max", save_top_k=2)\n'
                'trainer = L.Trainer(max_epochs=4, accelerator="cpu", enable_progress_bar=False, num_sanity_val_steps=0,\n'
                '                    enable_model_summary=False, callbacks=[ckpt])\n')
    fit = "trainer.fit(model, train, val)\n"
    cells = [PL_SETUP, PL_MODULE, trainer(dirpath)]
    _record(cells, fit, "pl-best", store)
    folder = tmp_path / (dirpath or "lightning_logs/version_0/checkpoints")
    recorded = {p.name: p.read_bytes() for p in folder.glob("*.ckpt")}
    assert len(recorded) == 2
    _record([PL_SETUP, PL_MODULE, trainer(dirpath and dirpath + "-truth")], PL_BEST + fit, "pl-truth", store)
    truth = {k: v for k, v in _truth(store, "pl-truth", "top", {2, 3}).items()}
    assert truth[(2, -1, 0)].count(".ckpt") == 2  # the state the replay must start from: two files known

    df = flor.replay("pl-best", epochs="2,3", code=PL_BEST + fit, store=store)
    verdict = df.attrs["verdict"]
    assert verdict.startswith("Faithful replay"), verdict
    assert _values(df, "top", {2, 3}) == truth
    assert _values(df, "best", {2, 3}) == _truth(store, "pl-truth", "best", {2, 3})
    assert {p.name: p.read_bytes() for p in folder.glob("*.ckpt")} == recorded  # the recording's files, untouched
    if dirpath is None:
        replayed = tmp_path / "lightning_logs" / "version_2" / "checkpoints"
    else:
        [replayed] = folder.glob("flor-replay-*")
    assert sorted(p.name for p in replayed.glob("*.ckpt")) == sorted(recorded)  # kept and removed as recorded
    assert str(replayed / sorted(recorded)[0]) in verdict, verdict


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["lightning", "hf"])
def test_trainer_runs_recorded_before_checkpoint_names_were_kept_still_replay(store, tmp_path, monkeypatch, kind):
    """A run recorded before a trainer's checkpoint files were kept relative to their folder (no ModelCheckpoint
    knowledge, HF's best checkpoint as it was) replays capturing its trainer the same way, so it still compares."""
    pytest.importorskip("lightning" if kind == "lightning" else "transformers")
    from flor_nb import capture, state
    old = {k: v for k, v in capture.limits().items() if k != "framework_paths"}
    monkeypatch.setattr(state, "capture_limits", lambda: dict(old))
    if kind == "lightning":
        trainer = ('model = Net()\n'
                   'trainer = L.Trainer(max_epochs=3, accelerator="cpu", enable_progress_bar=False, num_sanity_val_steps=0,\n'
                   '                    enable_model_summary=False)\n')
        run = _record([PL_SETUP, PL_MODULE, trainer], "trainer.fit(model, train, val)\n", "old", store)
    else:
        args = HF_ARGS.replace('save_strategy="no"', 'save_strategy="epoch", load_best_model_at_end=True')
        run = _record([HF_DATA, HF_TRAINER, args], "trainer.train()\n", "old", store)
    monkeypatch.undo()
    assert "framework_paths" not in run.state["limits"]
    from flor_nb import checkpoint
    ck = store.checkpoints(run.id)[-1]
    tree = checkpoint.read(store.home, ck["path"])["tensors"]["obj/trainer"]
    assert "checkpoint_callbacks" not in tree and "relative_paths" not in tree  # captured as it was then
    verdict = flor.replay("old", epochs="1", store=store).attrs["verdict"]
    assert verdict.startswith("Faithful replay"), verdict


@pytest.mark.timeout(400)
def test_hf_trainer_with_accumulation_early_stopping_and_checkpoints(store, tmp_path):
    """Gradient accumulation, HF's own checkpoints every epoch with the best model loaded at the end, an
    EarlyStoppingCallback (exportable state) and a callback with state of its own: replayed bit for bit."""
    pytest.importorskip("transformers")
    args = HF_ARGS.replace('logging_steps=2, eval_strategy="epoch", save_strategy="no"',
                           'logging_steps=3, eval_strategy="epoch", save_strategy="epoch", gradient_accumulation_steps=2,\n'
                           '                         load_best_model_at_end=True, metric_for_best_model="eval_loss",'
                           ' warmup_steps=2, max_grad_norm=0.5')
    args = args.replace("eval_dataset=Tokens(ids[128:]))", "eval_dataset=Tokens(ids[128:]),\n"
                        "                    callbacks=[EarlyStoppingCallback(2), Evals()])")
    callbacks = ('from transformers import EarlyStoppingCallback, TrainerCallback\n'
                 'class Evals(TrainerCallback):\n'
                 '    def __init__(self): self.losses = []\n'
                 '    def on_evaluate(self, args, state, control, metrics=None, **kwargs):\n'
                 '        self.losses.append(metrics["eval_loss"])\n')
    assert "gradient_accumulation_steps=2" in args and "Evals()" in args
    run = _record([HF_DATA, HF_TRAINER, callbacks, args], "trainer.train()\n", "ga", store)
    assert run.status == "finished" and run.state["not_captured"] == {}
    assert sum(kind == "attrs" for kind in run.state["objects"].values()) == 2  # the two callbacks
    df = flor.replay("ga", epochs="0,3", workers=1, store=store)  # two segments, one after the other in one process
    verdict = df.attrs["verdict"]
    assert verdict.startswith("Faithful replay"), verdict
    assert "train/train_loss exact (1 value)" in verdict  # the summary HF logs after the last epoch
    assert "hf-out/flor-replay-" in verdict and "/checkpoint-" in verdict  # HF's own, in the replay's folder



@pytest.mark.timeout(300)
def test_hf_replay_never_rotates_away_the_recorded_checkpoints(store, tmp_path):
    """``save_total_limit=1``: HF removes the oldest checkpoints of its output folder after each save. A replay
    saving into the recording's folder removed the recording's last checkpoint, unsaid; the replay's Trainer
    now saves into a folder of its own inside it, and the verdict names what it wrote."""
    pytest.importorskip("transformers")
    args = HF_ARGS.replace('save_strategy="no"', 'save_strategy="epoch", save_total_limit=1')
    assert "save_total_limit=1" in args
    _record([HF_DATA, HF_TRAINER, args], "trainer.train()\n", "rotating", store)
    out = tmp_path / "hf-out"
    recorded = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {p.split("/")[0] for p in recorded} == {"checkpoint-16"}
    verdict = flor.replay("rotating", epochs="1", store=store).attrs["verdict"]
    assert verdict.startswith("Faithful replay") and "removed" not in verdict, verdict
    assert {k: v for k, v in ((str(p.relative_to(out)), p.read_bytes()) for p in out.rglob("*") if p.is_file())
            if not k.startswith("flor-replay-")} == recorded
    [own] = out.glob("flor-replay-*")
    assert [p.name for p in own.iterdir()] == ["checkpoint-8"] and f"wrote {own / 'checkpoint-8'}/" in verdict


@pytest.mark.timeout(300)
def test_trainer_built_in_the_recorded_cell(store):
    """``trainer = L.Trainer(...)`` and ``trainer.fit(...)`` in one cell: the class called says it is a trainer."""
    pytest.importorskip("lightning")
    code = PL_TRAINER.replace("max_epochs=4", "max_epochs=2") + "trainer.fit(model, train, val)\n"
    run = _record([PL_SETUP, PL_MODULE], code, "one-cell", store)
    assert run.state["loops"]["framework"]["call"] == "trainer.fit" and run.epochs_completed == 2
    df = flor.replay("one-cell", epochs="1", store=store)
    assert df.attrs["verdict"].startswith("Faithful replay"), df.attrs["verdict"]
