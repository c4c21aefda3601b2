"""A tiny experiment for the sweep-runner tests, trained by fake_train.py (no JAX)."""
import ml_collections


def _args(arg):
    return dict(item.split("=", 1) for item in (arg or "").split(",") if item)


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"d_model": 8, "n_layers": 1})
    c.train = ml_collections.ConfigDict({"peak_lr": float(_args(arg).get("lr", 1e-3)), "tokens_per_param": 20.0})
    c.data = ml_collections.ConfigDict({"source": "synthetic"})
    # outcome: 'finish' | 'crash' | 'no_summary' | 'interrupt_once' (dies once, then resumes and finishes)
    c.fake = ml_collections.ConfigDict({"outcome": "finish", "shape": (1, 2), "verbose": False, "label": "x"})
    return c


def sweep(arg=None):
    runs = [{"name": "d8", "model.d_model": 8},
            {"name": "d16", "model.d_model": 16, "model.n_layers": 2, "fake.verbose": True,
             "fake.shape": (3, 4), "fake.label": "a b=c"},
            {"name": "crash", "model.d_model": 24, "fake.outcome": "crash"},
            {"name": "flaky", "model.d_model": 32, "fake.outcome": "interrupt_once"}]
    if "good" in _args(arg):
        runs = runs[:2]
    return runs
