"""all_methods_digits:runlocal end to end, with a stood-in teacher (digits_reflow's test trains one); the
table's checks are test_all_methods.py's."""

from conftest import experiment_config, stand_in_teacher
from flowjax import pipeline
from test_all_methods import check_run, same_budget


def test_all_methods_digits_runlocal(tmp_path):
    full = experiment_config('all_methods_digits')
    same_budget(full)
    assert full.slimflow_s0.model.nf == 8 and full.teacher.model.nf == 16 and full.rfpp_s0.flow.loss == 'pseudo_huber'
    assert full.evaluate.eval.preservation == full.evaluate.eval.reconstruction == 1000
    config = experiment_config('all_methods_digits', 'runlocal')
    stand_in_teacher(config, tmp_path / 'teacher_export')
    pipeline.run(config, str(tmp_path / 'run'))
    t = check_run(tmp_path / 'run', seeds=1)
    assert t['metric'] == 'fd_digits' and t['score'] == 'psnr'
    assert t['methods']['rf_teacher']['seconds'] is None  # stood in: no stage ran
