"""Networks that only measure (FID's Inception-v3, LPIPS, the fd_digits classifier) and the readers
of their published weights; the networks that are trained live in flowjax.models."""
