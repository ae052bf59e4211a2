"""Every DISTTRAIN_* variable is read by disttrain.config: parsed once, with an error naming
the variable and its value when the value cannot be used."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from disttrain import config

ROOT = Path(__file__).resolve().parents[1]


def test_a_launcher_environment_is_parsed_into_typed_fields():
    settings = config.from_env({
        "DISTTRAIN_ROLE": "server", "DISTTRAIN_SCHEDULER": "10.0.0.1:9000",
        "DISTTRAIN_NUM_WORKERS": "4", "DISTTRAIN_NUM_SERVERS": "2", "DISTTRAIN_DEVICE": "cuda:1",
        "DISTTRAIN_RANK": "3", "DISTTRAIN_HOST": "10.0.0.2", "DISTTRAIN_HEARTBEAT_TIMEOUT": "2.5",
        "DISTTRAIN_TIMEOUT": "60", "DISTTRAIN_REALTIME": "1", "DISTTRAIN_KEYS": "/job/keys",
        "DISTTRAIN_INSECURE": "0", "DISTTRAIN_METRICS_DIR": "/job/metrics",
        "DISTTRAIN_OBSERVE": "report,trace", "DISTTRAIN_PROGRESS": "0", "PATH": "/bin"})
    assert settings == config.Config(
        role="server", scheduler="10.0.0.1:9000", num_workers=4, num_servers=2, device="cuda:1",
        rank=3, host="10.0.0.2", heartbeat_timeout=2.5, timeout=60.0, realtime=True,
        keys="/job/keys", insecure=False, metrics_dir="/job/metrics",
        observe=frozenset({"report", "trace"}), progress=False)
    assert config.from_env({"DISTTRAIN_OBSERVE": "report"}).observe == {"report"}
    assert config.from_env({"DISTTRAIN_INSECURE": "1"}).insecure is True
    recovering = config.from_env({"DISTTRAIN_RESTART_TIMEOUT": "30", "DISTTRAIN_INCARNATION": "2",
                                  "DISTTRAIN_SERVER_REPLICAS": "1"})
    assert (recovering.restart_timeout, recovering.incarnation, recovering.server_replicas,
            recovering.recovery) == (30.0, 2, 1, True)
    assert config.from_env({}).recovery is False


def test_unset_and_empty_variables_take_the_documented_defaults():
    empty = {config.variable(f.name): "" for f in dataclasses.fields(config.Config)}
    for environ in ({}, empty):
        settings = config.from_env(environ)
        assert (settings.role, settings.rank, settings.host, settings.device, settings.timeout,
                settings.heartbeat_timeout, settings.realtime, settings.keys, settings.insecure,
                settings.metrics_dir, settings.observe, settings.progress) == \
            (None, None, None, "cpu", 300.0, 10.0, False, None, False, None, frozenset(), True)


def test_the_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.from_env({}).rank = 1


@pytest.mark.parametrize("variable, value, message", [
    ("DISTTRAIN_ROLE", "boss", "DISTTRAIN_ROLE='boss' must be one of scheduler, server, worker"),
    ("DISTTRAIN_SCHEDULER", "localhost", "DISTTRAIN_SCHEDULER='localhost' must be host:port"),
    ("DISTTRAIN_SCHEDULER", ":9000", "DISTTRAIN_SCHEDULER=':9000' must be host:port"),
    ("DISTTRAIN_NUM_WORKERS", "two", "DISTTRAIN_NUM_WORKERS='two' must be a non-negative integer"),
    ("DISTTRAIN_NUM_SERVERS", "-1", "DISTTRAIN_NUM_SERVERS='-1' must be a non-negative integer"),
    ("DISTTRAIN_RANK", "1.0", "DISTTRAIN_RANK='1.0' must be a non-negative integer"),
    ("DISTTRAIN_DEVICE", "gpu", "DISTTRAIN_DEVICE='gpu' must be cpu or cuda:N"),
    ("DISTTRAIN_DEVICE", "cuda:x", "DISTTRAIN_DEVICE='cuda:x' must be cpu or cuda:N"),
    ("DISTTRAIN_TIMEOUT", "soon", "DISTTRAIN_TIMEOUT='soon' is not a number of seconds"),
    ("DISTTRAIN_TIMEOUT", "0", "DISTTRAIN_TIMEOUT='0' must be positive"),
    ("DISTTRAIN_HEARTBEAT_TIMEOUT", "-3", "DISTTRAIN_HEARTBEAT_TIMEOUT='-3' must be positive"),
    ("DISTTRAIN_HEARTBEAT_TIMEOUT", "nan", "DISTTRAIN_HEARTBEAT_TIMEOUT='nan' must be positive"),
    ("DISTTRAIN_REALTIME", "yes", "DISTTRAIN_REALTIME='yes' must be 0 or 1"),
    ("DISTTRAIN_RESTART_TIMEOUT", "0", "DISTTRAIN_RESTART_TIMEOUT='0' must be positive"),
    ("DISTTRAIN_INCARNATION", "-1", "DISTTRAIN_INCARNATION='-1' must be a non-negative integer"),
    ("DISTTRAIN_PROGRESS", "off", "DISTTRAIN_PROGRESS='off' must be 0 or 1"),
    ("DISTTRAIN_OBSERVE", "report,timeline",
     "DISTTRAIN_OBSERVE='report,timeline' must be a comma-separated list of report, trace"),
    ("DISTTRAIN_OBSERVE", "report,", "DISTTRAIN_OBSERVE='report,' must be a comma-separated"),
    ("DISTTRAIN_INSECURE", "true", "DISTTRAIN_INSECURE='true' must be 0 or 1"),
])
def test_a_bad_value_is_refused_naming_the_variable_and_the_value(variable, value, message):
    with pytest.raises(config.ConfigError) as error:
        config.from_env({variable: value})
    assert message in str(error.value)


@pytest.mark.parametrize("field, message", [
    ("scheduler", "DISTTRAIN_SCHEDULER='' must be host:port"),
    ("num_workers", "DISTTRAIN_NUM_WORKERS='' must be a non-negative integer"),
])
def test_a_required_setting_that_is_unset_names_its_variable(field, message):
    with pytest.raises(config.ConfigError, match=message):
        config.from_env({}).required(field)
    assert config.from_env({"DISTTRAIN_NUM_WORKERS": "0"}).required("num_workers") == 0


def test_only_the_config_module_reads_disttrain_variables():
    # The launcher writes them for its children and tests set them; disttrain, launch and
    # the worker programs read them only through disttrain.config.
    readers = subprocess.run(
        ["grep", "-rlE", r"environ(\.get)?[\[(]\s*[\"']DISTTRAIN_|getenv\([\"']DISTTRAIN_",
         "disttrain", "launch", "workers"], cwd=ROOT, capture_output=True, text=True)
    assert readers.returncode in (0, 1), readers.stderr
    assert readers.stdout.split() == []
