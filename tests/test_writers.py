"""Tests for flowjax.writers: TensorBoard event files (scalars, images) without TensorFlow, read back
record by record."""

import io
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from flowjax import writers


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(logdir) -> list[event_pb2.Event]:
    """Every event of every event file in `logdir` (TFRecord framing, both checksums checked)."""
    events = []
    for path in sorted(logdir.glob('events.out.tfevents.*')):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,), (length_crc,) = struct.unpack('<Q', header), struct.unpack('<I', data[pos + 8:pos + 12])
            assert length_crc == _masked(_crc32c(header))
            body = data[pos + 12:pos + 12 + length]
            (body_crc,) = struct.unpack('<I', data[pos + 12 + length:pos + 16 + length])
            assert body_crc == _masked(_crc32c(body))
            events.append(event_pb2.Event.FromString(body))
            pos += 16 + length
    return events


def _values(events):
    return [(e.step, v) for e in events for v in e.summary.value]


def test_scalars_and_image_read_back(tmp_path):
    image = np.zeros((6, 10, 3), np.uint8)
    image[1:3, 2:7] = (255, 0, 40)
    tb = writers.TensorBoard(tmp_path)
    tb.scalars(10, {'loss': 0.25, 'lr': 1e-3})
    tb.scalars(20, {'loss': 0.125})
    tb.image(20, 'samples', image)
    tb.close()

    values = _values(read_events(tmp_path))
    scalars = [(step, v.tag, v.simple_value) for step, v in values if v.WhichOneof('value') == 'simple_value']
    assert scalars == [(10, 'loss', 0.25), (10, 'lr', pytest.approx(1e-3)), (20, 'loss', 0.125)]
    (step, shown), = [(step, v.image) for step, v in values if v.HasField('image')]
    assert step == 20 and (shown.height, shown.width, shown.colorspace) == (6, 10, 3)
    with Image.open(io.BytesIO(shown.encoded_image_string)) as decoded:
        np.testing.assert_array_equal(np.asarray(decoded.convert('RGB')), image)


def test_image_refuses_floats(tmp_path):
    tb = writers.TensorBoard(tmp_path)
    with pytest.raises(ValueError, match="'x': dtype float32, expected uint8"):
        tb.image(0, 'x', np.zeros((4, 4), np.float32))
    tb.close()


def test_metrics_writer_logs_tensorboard_scalars(tmp_path):
    writer = writers.MetricsWriter(tmp_path)
    writer.write(5, {'loss': 1.5, 'grad_norm': 3.0})
    writer.close()
    assert (tmp_path / 'metrics.jsonl').exists()
    values = _values(read_events(tmp_path / 'tensorboard'))
    assert [(s, v.tag, v.simple_value) for s, v in values] == [(5, 'loss', 1.5), (5, 'grad_norm', 3.0)]


def test_log_png(tmp_path):
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format='PNG')
    writers.log_png(tmp_path, 0, 'samples', buf.getvalue())
    (_, value), = _values(read_events(tmp_path / 'tensorboard'))
    assert value.tag == 'samples' and (value.image.height, value.image.width) == (4, 5)


def test_tensorboard_imports_neither_tensorflow_nor_torch(tmp_path):
    code = ('import sys; from flowjax import writers; tb = writers.TensorBoard(sys.argv[1]); '
            "tb.scalars(1, {'a': 1.0}); tb.close(); print(sorted({'tensorflow', 'torch'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, '-c', code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == '[]'
