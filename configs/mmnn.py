r"""MMNN (sarcoma multimodal Cox network): 3D DenseNet-121 on T1c + T2 fat-sat
plus a clinical MLP, concatenation fusion, Cox heads for OS and DM, gradient
blending between the multimodal and unimodal heads.

Paper settings (GPU hosts): DenseNet-121 at 128^3, batch 8 with gradient
accumulation to a super-batch of 64, SGD with Nesterov momentum, one-cycle
schedule (max lr 5e-4), weight decay 1e-4, 200 epochs, blending every 5 epochs.

  python launch.py --config=configs/mmnn.py --workdir=runs/mmnn

Variants are selected by the config argument (comma separated):
  local               small grid and network; about 2-3 min on 2 CPU cores
  cohort=NAME         rotterdam_rendered (default), sarcoma_phantom, or a path
                      to a manifest CSV (then set --config.data.numeric etc.)
  modalities=image    image only; modalities=clinical: clinical only
  n_patients=N        use a deterministic subset of a demo cohort

  python launch.py --config=configs/mmnn.py:local --workdir=runs/local
  python launch.py --config=configs/mmnn.py:local,modalities=clinical --workdir=runs/local_clin

Expected results (``local`` on rotterdam_rendered, 2 CPU cores, about 2 min
15 s with the cohort prepared; test split, Harrell's C with bootstrap SD):
multimodal OS 0.71 (0.017), DM 0.69 (0.017), measured 0.705 / 0.686 on
2026-12-02 (selected epoch 21; 0.709 / 0.691 on 2026-12-01 with XLA's 3D
convolutions, which are slower on CPU: same maths, other float32 rounding;
runs on other machines of the same kind varied by about 0.01; 0.714 / 0.687 on
2026-12-04 with the 3^3 stem as im2col, selected epoch 8); clinical only
0.705 / 0.677; image only 0.628 / 0.611. The paper's default config has not
been run here (no GPU host).
"""

import ml_collections

from configs.common import parse_arg
from jaxsurv.data import phantom

# Clinical columns a model may use, per demo cohort (the rendered cohort's
# tumour size and grade are in the image only): the numeric and categorical
# columns of each demo cohort's spec (``jaxsurv.data.phantom.cohort_spec``).
_CLINICAL = {
    name: dict(numeric=spec.numeric, categorical=spec.categorical)
    for name, spec in ((n, phantom.cohort_spec(n)) for n in phantom.CLINICAL_SPECS)
}


# Field of view (mm) centred on the tumour, per demo cohort: large enough
# for the largest rendered tumours plus their surroundings.
_FOV_MM = {"rotterdam_rendered": (96.0, 96.0, 96.0), "sarcoma_phantom": (160.0, 160.0, 160.0)}


_COMPARE = {
    "rotterdam_rendered": dict(
        sarculator=("age", "render_size", "render_grade"),
        clinical=_CLINICAL["rotterdam_rendered"]["numeric"]
        + _CLINICAL["rotterdam_rendered"]["categorical"] + ("render_size", "render_grade"),
        size_grade=("render_size", "render_grade")),
    "sarcoma_phantom": dict(
        sarculator=("age", "size_cm", "grade", "histotype"),
        clinical=_CLINICAL["sarcoma_phantom"]["numeric"]
        + _CLINICAL["sarcoma_phantom"]["categorical"],
        size_grade=("size_cm", "grade")),
}


def get_config(arg=None):
  """Returns the MMNN config; see the module docstring for ``arg``."""
  a = parse_arg(arg, local=False, cohort="rotterdam_rendered", modalities="image+clinical",
                n_patients=0)
  c = ml_collections.ConfigDict()
  c.seed = 42

  c.data = ml_collections.ConfigDict()
  c.data.cohort = a["cohort"]
  c.data.modalities = tuple(a["modalities"].split("+"))
  c.data.n_patients = a["n_patients"] or ml_collections.config_dict.placeholder(int)
  c.data.cohort_seed = 0  # Seed of the demo-cohort generator.
  c.data.prepare_workers = 2  # Processes preparing (preprocessing) the cohort once.
  c.data.channels = ("t1c", "t2fs")
  c.data.mask = "mask"
  clinical = _CLINICAL.get(a["cohort"], dict(numeric=(), categorical=()))
  c.data.numeric = clinical["numeric"]
  c.data.categorical = clinical["categorical"]
  c.data.outcomes = ("os", "dm")
  c.data.stratify = ("os_event", "dm_event")
  c.data.fractions = (0.7, 0.15, 0.15)
  c.data.split_seed = 0
  c.data.preprocess = ml_collections.ConfigDict(dict(
      spacing_mm=1.0,
      grid=(128, 128, 128),
      # A fixed physical field of view keeps tumour size visible in the grid
      # (cropping to the mask's bounding box would normalise it away).
      fov_mm=_FOV_MM.get(a["cohort"], ml_collections.config_dict.placeholder(tuple)),
      n4=False,
      zscore=True,
  ))

  c.model = ml_collections.ConfigDict()
  c.model.name = "mmnn"  # jaxsurv.models.registry
  c.model.image = ml_collections.ConfigDict(dict(
      init_features=64, growth_rate=32, block_config=(6, 12, 24, 16), bn_size=4,
      dropout_rate=0.2, features=12, head_dropout_rate=0.2, norm="batch", remat=False,
      # How the 3^3 convolutions run: "auto" = one 2D convolution over depth
      # slices on CPU (XLA's CPU 3D convolution is slow), cuDNN's 3D one on
      # GPU; "native" or "slices" to force one. Same maths either way.
      conv_impl="auto",
      # Pretrained DenseNet weights (jaxsurv/models/pretrained.py; README,
      # "Pretrained image weights"): "" = train from scratch; a .safetensors
      # or .pt/.pth state dict; init_partial=True loads what matches (the
      # y-Aware BHB-10k encoder has no norm5); init_channels="repeat" adapts
      # a 1-channel first conv to the 2 channels (else an error).
      init_from="", init_partial=False, init_channels="error"))
  c.model.clinical = ml_collections.ConfigDict(dict(
      hidden_sizes=(32, 16, 8, 8, 8), features=12, dropout_rate=0.2, norm="batch"))
  c.dtype = "float32"  # "bfloat16": bf16 compute, fp32 parameters.
  # Which library runs the CPU 2D convolutions (jaxsurv.models.conv): "eigen"
  # for DenseNet-121, whose step it ran 0-7% faster than YNNPACK (XLA's own
  # choice, "xla") at 32^3, batch 2, on 2 cores; no effect on GPU.
  c.xla_cpu_convolutions = "eigen"

  c.loss = ml_collections.ConfigDict(dict(name="cox", ties="breslow", l1=0.0))

  c.batch_size = 8  # Global batch (all devices); the Cox risk set is this batch.
  # Every batch full: a short last batch would make a small Cox risk set.
  c.drop_remainder = True
  c.grad_accum_steps = 8  # Optimiser step every 8 batches: super-batch of 64.
  c.num_epochs = 200
  c.eval_batch_size = 16
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", lr=5e-4, momentum=0.9, nesterov=True, weight_decay=1e-4,
      schedule="onecycle", pct_start=0.3, div_factor=25.0, final_div_factor=1e4))

  c.augment = ml_collections.ConfigDict(dict(
      enabled=True, flip_prob=0.5, max_rotation_deg=15.0, zoom_range=(0.9, 1.1)))

  c.blend = ml_collections.ConfigDict(dict(
      enabled=len(c.data.modalities) > 1,
      every_epochs=5,
      # Held-out set V for the blending estimates, carved from the training
      # split (Wang et al. 2020), never the validation split used for selection.
      holdout_fraction=0.1,
      mode="sum",  # w ~ dG/dO^2 normalised by the sum; "softmax": the MMNN code's variant.
  ))

  c.eval = ml_collections.ConfigDict(dict(
      horizons_years=(2.0, 5.0), bootstrap_resamples=200))
  # python -m jaxsurv.compare mmnn (Table 3): the variables of the classical
  # rows, per cohort. "sarculator": the Sarculator nomogram's age, tumour
  # size, grade and histology where the cohort has them (rotterdam_rendered is
  # breast cancer: no histology; its size band and grade are the ones the
  # images were rendered from, kept out of the networks' clinical table);
  # "clinical": the larger clinical model. "size_grade": the cohort's tumour
  # size and grade columns (the table says which rows saw them).
  c.compare = ml_collections.ConfigDict(_COMPARE.get(a["cohort"], dict(
      sarculator=("age", "size", "grade", "histology"), clinical=tuple(c.data.numeric)
      + tuple(c.data.categorical), size_grade=())))
  c.compare.rsf = ml_collections.ConfigDict(dict(
      n_estimators=200, min_samples_leaf=15, max_features="sqrt", n_jobs=-1))
  # Radiomics + clinical elastic-net Cox: alpha and l1_ratio chosen by 5-fold
  # CV on Harrell's C inside the training split (the paper's "5-fold CV ...
  # optimizing the concordance index"); alphas from the l1_ratio's own path.
  c.compare.coxnet = ml_collections.ConfigDict(dict(
      l1_ratios=(0.1, 0.5, 0.9, 1.0), n_alphas=20, alpha_min_ratio=0.01, folds=5))

  c.log_every_steps = 10  # Non-finite loss check and progress every 10 steps.
  c.progress_bar = True
  c.selection = "val_loss"  # Unweighted mm-head Cox loss on the whole validation split.

  if a["local"]:
    c.data.preprocess.grid = (24, 24, 24)
    c.data.preprocess.spacing_mm = 2.0
    c.model.image.update(dict(init_features=8, growth_rate=4, block_config=(2, 2), bn_size=2,
                              norm="batch", stem_kernel=3))
    c.batch_size = 32
    c.grad_accum_steps = 1
    # At these shapes XLA's own choice (YNNPACK) was 0-5% faster than Eigen.
    c.xla_cpu_convolutions = "xla"
    # 24 epochs with blending every 4: validation C-index 0.654 (OS) / 0.635
    # (DM) against 0.640 / 0.628 with 12 epochs every 3 (rotterdam_rendered,
    # chosen on the validation split only); about 2 minutes on 2 idle cores.
    c.num_epochs = 24
    c.eval_batch_size = 64
    # Decoupled weight decay (AdamW), as in every earlier local run.
    c.optimizer.update(dict(name="adamw", lr=3e-3, weight_decay=1e-4))
    c.blend.every_epochs = 4
    c.eval.bootstrap_resamples = 100
  return c
