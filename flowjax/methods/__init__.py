"""Methods: one module each (rf, reflow, distill, slimflow; with generate and evaluate at the
package root), each declaring a `method.Method`; `table.py` lists them. `training.py` holds what
every training method shares: the loss context, the static checks and `fit`."""
