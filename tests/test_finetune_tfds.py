"""finetune.task=tfds:NAME on a labelled TFDS dataset built locally (no network): ClassLabel names, the text
feature, unlabelled and missing splits taken from train, refused input."""
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cgpt_jax.config import base_config
from cgpt_jax.errors import InputError
from cgpt_jax.finetune.data import read_task

LABELS = ["negative", "positive"]


class CgptTinySentiment(tfds.core.GeneratorBasedBuilder):
    """GLUE-like: 'sentence' and a ClassLabel 'label'; a test split whose labels are hidden (-1)."""

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # downloads nothing

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"idx": tfds.features.Scalar(dtype=np.int32), "sentence": tfds.features.Text(),
             "label": tfds.features.ClassLabel(names=LABELS)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(200, hidden=False), "test": self._generate_examples(20, hidden=True)}

    def _generate_examples(self, n: int, hidden: bool):
        for i in range(n):
            yield i, {"idx": i, "sentence": f"{'a fine' if i % 2 else 'an awful'} film, number {i} of {n}",
                      "label": -1 if hidden else i % 2}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    directory = str(tmp_path_factory.mktemp("tfds"))
    CgptTinySentiment(data_dir=directory, file_format="array_record").download_and_prepare()
    return directory


def _ft(task: str, **fields) -> ml_collections.ConfigDict:
    ft = base_config().finetune
    ft.task = task
    for k, v in fields.items():
        ft[k] = v
    return ft


def test_labelled_tfds_dataset(data_dir):
    task = read_task(_ft("tfds:cgpt_tiny_sentiment"), data_dir)
    assert task.label_names == LABELS
    sizes = {s: len(e) for s, e in task.splits.items()}
    assert sum(sizes.values()) == 200  # the hidden-label test split is not used; test and validation come from train
    assert 0 < sizes["test"] < 40 and 0 < sizes["validation"] < 40
    texts = {s: {e.text for e in examples} for s, examples in task.splits.items()}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    assert all(e.label == ("positive" if e.text.startswith("a fine") else "negative")
               for examples in task.splits.values() for e in examples)


def test_refused_tfds_input(data_dir, tmp_path):
    with pytest.raises(InputError, match="no ClassLabel feature 'sentiment'"):
        read_task(_ft("tfds:cgpt_tiny_sentiment", label_field="sentiment"), data_dir)
    with pytest.raises(InputError, match="not prepared in"):
        read_task(_ft("tfds:cgpt_tiny_sentiment"), str(tmp_path))
    with pytest.raises(InputError, match="no TFDS dataset of that name"):
        read_task(_ft("tfds:no_such_dataset_anywhere"), data_dir)
