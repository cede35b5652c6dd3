"""The model registry: ``config.model.name`` -> a Flax module and its call contract.

Every model family trains through ``jaxsurv.trainer`` with one call
contract: ``Adapter.apply(model, variables, inputs, presence, *, train,
rngs=None, mutable=False)`` returns ``(outputs, aux)`` (and the mutated
collections when ``mutable`` is given), where

* ``inputs`` is ``{modality: array}`` (``image [batch, depth, height, width,
  channels]``; tabular ``[batch, features]``; bags ``[batch, tiles, dim]``
  plus ``"<m>_tile_mask" [batch, tiles]``) and ``presence`` is ``{modality:
  bool [batch]}`` (``{}`` for models without missing modalities);
* ``outputs`` is ``{name: array}`` (MMNN: ``{head: [batch, outcomes]}``
  log-hazards; the fusion zoo: ``{"out": [batch, n_out]}``) and ``aux`` the
  model's named intermediates (attention maps, embeddings).

A new family adds a model file, an adapter (if its ``__call__`` differs from
either contract below) and a ``register`` call; the trainer, checkpoints,
evaluation and predict need no change.
"""

from __future__ import annotations

import dataclasses

from jaxsurv.errors import UserError


@dataclasses.dataclass(frozen=True)
class MMNNAdapter:
  """``MMNN.__call__(image, clinical, *, train)`` under the common contract.

  ``n_input_keys``: the RNG streams of the family's training-time input
  transforms (MMNN: one, the image augmentation), split from each step's key
  before the dropout key.
  """
  n_input_keys: int = 1

  def apply(self, model, variables, inputs, presence, *, train, rngs=None, mutable=False):
    del presence
    return model.apply(variables, inputs.get("image"), inputs.get("clinical"), train=train,
                       rngs=rngs, mutable=mutable)

  def init(self, model, rng, inputs, presence):
    del presence
    return model.init(rng, inputs.get("image"), inputs.get("clinical"), train=False)


@dataclasses.dataclass(frozen=True)
class FusionAdapter:
  """``Model.__call__(inputs, presence, *, train) -> (out, aux)`` (fusion zoo),
  with ``out`` returned as ``{"out": out}``; two input RNG streams (modality
  dropout, input noise)."""
  n_input_keys: int = 2

  def apply(self, model, variables, inputs, presence, *, train, rngs=None, mutable=False):
    res = model.apply(variables, inputs, presence, train=train, rngs=rngs, mutable=mutable)
    if mutable:
      (out, aux), updates = res
      return ({"out": out}, aux), updates
    out, aux = res
    return {"out": out}, aux

  def init(self, model, rng, inputs, presence):
    return model.init(rng, inputs, presence, train=False)


@dataclasses.dataclass(frozen=True)
class Entry:
  """A registered model family.

  Attributes:
    name: ``config.model.name``.
    driver: the module whose ``train_and_evaluate(config, workdir)``
      prepares the family's data and reports around the shared trainer
      (``launch.py`` runs it).
    adapter: its call contract.
    module: the module's import path and class, for docs and errors.
  """
  name: str
  driver: str
  adapter: object
  module: str


_REGISTRY: dict[str, Entry] = {}


def register(entry: Entry) -> None:
  """Adds a family; names are unique."""
  if entry.name in _REGISTRY:
    raise ValueError(f"model {entry.name!r} is already registered")
  _REGISTRY[entry.name] = entry


def get(name: str) -> Entry:
  """The registered family ``name``.

  Raises:
    UserError: an unknown name (the message lists the known ones).
  """
  if name not in _REGISTRY:
    raise UserError(f"config.model.name {name!r} is not a registered model; known: "
                    f"{sorted(_REGISTRY)}")
  return _REGISTRY[name]


def names(driver: str | None = None) -> tuple[str, ...]:
  """Registered names (in registration order), optionally of one driver."""
  return tuple(n for n, e in _REGISTRY.items() if driver is None or e.driver == driver)


register(Entry("mmnn", "jaxsurv.train", MMNNAdapter(), "jaxsurv.models.mmnn.MMNN"))
for _name, _cls in (("healnet", "healnet.HEALNet"), ("early_fusion", "healnet.HEALNet"),
                    ("cmmmf", "fusion.CMMMF"), ("concat", "fusion.ConcatFusion"),
                    ("mean", "fusion.MeanFusion"), ("bilinear", "fusion.BilinearFusion"),
                    ("porpoise", "fusion.PorpoiseGatedLateFusion"),
                    ("unimodal", "fusion.Unimodal")):
  register(Entry(_name, "jaxsurv.fusion_train", FusionAdapter(), f"jaxsurv.models.{_cls}"))
register(Entry("sarcnet", "jaxsurv.sarcnet", FusionAdapter(), "jaxsurv.models.sarcnet.SarcNet"))
