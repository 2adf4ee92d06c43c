"""Hugging Face safetensors checkpoints <-> ``LlamaForCausalLM``, on one device or sharded.

A Hugging Face tensor name is the NNX parameter path joined by dots with the leaf renamed:
``kernel``/``embedding``/``scale`` -> ``weight`` and ``bias`` -> ``bias``. Torch ``Linear``
weights are ``[out, in]``; our kernels are ``[in, out]``, so kernels are transposed on the way
in and out. Stacked layers (``scan_layers``) map slice ``i`` of the leading axis to
``model.layers.{i}``. ``config_from_hf`` / ``config_to_hf`` translate ``config.json``
(module ``naming``).

Loading onto a mesh: the model is built abstractly (``nnx.eval_shape``); each parameter's
``NamedSharding`` comes from its logical axis names and the rules. For every distinct shard
index this process's devices hold, exactly that slice is read from the files
(``safe_open(...).get_slice``: kernels are transposed and stacked layers assembled slice by
slice on the host) and put on those devices, one slice at a time. So host memory peaks at
about one shard of one tensor, no device ever holds more than its shard, and in a
multi-process run each process reads only its own devices' part of the checkpoint (module
``load``).

Saving: tensors go to the host one Hugging Face tensor at a time (one layer of a stacked
parameter) -- assembled from the local shards when the process holds them all, else
all-gathered one tensor at a time -- and are written into safetensors files of bounded size.
In a multi-process run every process joins the gathers and process 0 alone writes
(module ``save``).
"""

from mofo_jax.finetune.checkpoints_hf.load import (
  HostSource,
  SafetensorsSource,
  check_mesh,
  load_hf_checkpoint,
  model_from_hf_tensors,
)
from mofo_jax.finetune.checkpoints_hf.naming import config_from_hf, config_to_hf
from mofo_jax.finetune.checkpoints_hf.save import hf_tensors_from_model, save_hf_checkpoint

__all__ = [
  "HostSource",
  "SafetensorsSource",
  "check_mesh",
  "config_from_hf",
  "config_to_hf",
  "hf_tensors_from_model",
  "load_hf_checkpoint",
  "model_from_hf_tensors",
  "save_hf_checkpoint",
]
