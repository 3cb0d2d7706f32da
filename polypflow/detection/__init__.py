"""Polyp detection: the other half of the EndoCV 2021 entry (METHODS.md section 3), one-stage ATSS + GFLv2.

README section (which parts are ours and which come from maintained libraries)
-------------------------------------------------------------------------------
**Detection.** ``gfl_atss`` is a one-stage, anchor-based polyp detector: ATSS sample selection (S. Zhang
et al., CVPR 2020) and Generalized Focal Loss v2 (X. Li et al., CVPR 2021) on a feature pyramid over a
timm encoder (EfficientNet-Lite0 with offline ImageNet weights by default). Its targets are the boxes of
the masks' connected components, so every dataset and split has boxes.

| part | from | where |
|---|---|---|
| encoder | timm (``features_only``) | ``models/encoders.py`` |
| feature pyramid (P3-P5, or P3-P7 with ``LastLevelP6P7``) | torchvision ``ops.FeaturePyramidNetwork`` | ``models/gfl_atss.py`` |
| box IoU, GIoU loss, NMS, clipping | torchvision ``ops`` | throughout |
| connected components | OpenCV ``connectedComponentsWithStats`` | ``boxes.py`` |
| box matching (ours vs Kvasir's) | SciPy ``linear_sum_assignment`` | ``boxes.py`` |
| COCO AP / AP50 / AP75 / AR, PR curve | torchmetrics ``MeanAveragePrecision`` (pycocotools) | ``evaluate.py`` |
| augmentation | albumentations (the segmenters' pipeline) | ``polypflow/data.py`` |
| ONNX export | torch.onnx (dynamo), ONNX Runtime | ``export.py`` |
| **ours**: GFLv2 head (shared towers, per-level scale, edge distributions), DGQP | no maintained package ships them | ``models/gfl_atss.py`` |
| **ours**: ATSS assignment | | ``atss.py`` |
| **ours**: Quality Focal Loss, Distribution Focal Loss, GFL's weighting | | ``losses.py`` |
| **ours**: anchors and edge-distance coding | | ``models/anchors.py`` |
| **ours**: boxes from masks, Kvasir-SEG box agreement, boxes from a segmenter's map | | ``boxes.py``, ``evaluate.py`` |

Boxes are ``(x1, y1, x2, y2)`` in continuous pixel coordinates, ``x2``/``y2`` exclusive (``x2 - x1`` is the
width in pixels). Kvasir-SEG's ``kavsir_bboxes.json`` boxes are one pixel larger on the left and top
(their ``xmin``/``ymin`` is the last background column/row) and equal on the right and bottom; on all
1000 images, mask-derived boxes (components of at least 10 pixels) match 99.2 % of Kvasir's 1071 boxes at
IoU >= 0.5 with mean IoU 0.987; the unmatched ones are mostly 1-3 pixel slivers along a mask's edge.

The exported ONNX graph stops before NMS (decoded boxes and scores for every anchor); NMS follows in
``models.gfl_atss.postprocess``, the same function PyTorch predictions go through.

Modules: :mod:`.boxes` (targets), :mod:`models.anchors`, :mod:`.atss`, :mod:`.losses`, :mod:`.data` (dataset,
collate), :mod:`.training` (loss of a batch, prediction, AP50), :mod:`.evaluate`, :mod:`.export`.
"""
