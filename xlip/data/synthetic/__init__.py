"""Synthetic chest radiographs with controllable findings and matching free-text reports.

The corpus the demo and the tests pre-train on. Every image is drawn from a random anatomy
(body habitus, lung shape, heart, mediastinum, spine, ribs, clavicles, diaphragm, gastric bubble)
under a random pose and exposure, with zero or more findings painted into it, and every report
describes exactly what was painted. Findings are visible only as local structure in the pixels:
no text is burned in, and the anatomy and exposure variation swamps what a finding does to global
intensity statistics (``tests/test_synthetic.py`` checks this with a logistic regression).

Modules: ``config`` (findings, attributes, :class:`SynthConfig`), ``anatomy`` (the scene: lungs,
heart, pose, exposure), ``findings`` (presence, attributes, geometry), ``render`` (scene → uint8
image), ``raster`` (grid helpers), ``reports`` (findings → report), ``corpus`` (files on disk,
montage).

Conventions
    * Images follow the radiological convention: the patient's right is on the image's left. All
      laterality (``"left"``, ``"right"``, ``"bilateral"``) is the patient's side, as in reports.
    * Geometry lives in *anatomy units*: the image spans ``[-1, 1]`` in both directions before the
      per-study pose (scale, rotation, shift) is applied; one unit is about 18 cm, used to state
      sizes in reports. Sizes set in pixels (nodule, mass, device lines) are set at 128 px and
      scale with ``size``, so any image size works.
    * Determinism: a study depends only on the generator handed to :func:`render_study`. The
      anatomy, exposure and presence draws take a fixed amount from it, every finding gets its own
      stream, so forcing one finding on or off (``SynthConfig.force``) leaves the anatomy and the
      other findings of the same seed unchanged. :func:`synthesize` seeds sample ``i`` of a split
      with ``np.random.default_rng([seed, split_id, i])``, so the worker count changes no byte.
    * Visibility: a finding is only reported when drawn where it can be seen (lesions avoid the
      heart, effusion fluid, the pneumothorax gap and each other); one that fits nowhere is
      dropped from both image and labels.
"""

from xlip.data.synthetic.config import NO_FINDING, SYNTH_FINDINGS, SynthConfig
from xlip.data.synthetic.corpus import montage, study, synthesize
from xlip.data.synthetic.render import render_study
from xlip.data.synthetic.reports import write_report

__all__ = ["NO_FINDING", "SYNTH_FINDINGS", "SynthConfig", "montage", "render_study", "study",
           "synthesize", "write_report"]
