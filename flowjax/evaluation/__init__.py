"""Evaluation of trained flows: the one job (job.py) that samples every model with every sampler
and scores it with the data kind's metric suite (toy.py: W2 and energy distance of point clouds;
images.py: Frechet distances in a metric network's features, with frechet.py), straightness
(straightness.py), and the report files written to the workdir (report.py)."""
