"""FID with TF Inception "2015-12-05" weights, in JAX (no torch / tensorflow imports).

`inception` holds the Flax network and the weights loader, `fid` the features, statistics and
Fréchet distance, `reference` the statistics files and the resumable reference-statistics cache.
CLI: ``python -m lees_jax.fid --help``.
"""

from lees_jax.fid.fid import (
    DEFAULT_BATCH_SIZE,
    FeatureExtractor,
    Statistics,
    check_images,
    compute_statistics,
    fid_from_statistics,
    frechet_distance,
    images_fingerprint,
    statistics_from_features,
)
from lees_jax.fid.inception import (
    WEIGHTS_SHA1,
    InceptionV3,
    WeightsError,
    default_weights_path,
    load_params,
    preprocess,
    resolve_weights_path,
    verify_weights,
)
from lees_jax.fid.reference import (
    load_or_compute_reference_stats,
    load_statistics,
    save_statistics,
)
