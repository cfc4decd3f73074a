"""The COCO data wing: COCO panoptic files (PNG <-> id maps, JSON), synthetic datasets, overlays."""
