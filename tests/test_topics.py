"""The topic tree: names are built in one place and bad levels are refused."""
import pytest

from tensorslm.agent.topics import BadTopicName, Topics


def test_topic_tree():
    t = Topics("fleet1")
    assert t.request("pi-01") == "fleet1/devices/pi-01/request"
    assert t.fleet_subscription("kitchen") == "$share/kitchen/fleet1/fleet/kitchen/request"
    assert t.reply("cli_7", "abc") == "fleet1/clients/cli_7/reply/abc"
    assert t.device_of("fleet1/devices/pi-01/records") == "pi-01"
    assert t.device_of("fleet1/clients/x/reply") is None


@pytest.mark.parametrize("device, message", [
    ("pi/01", "device id must be 1-64 letters"),
    ("+", "device id must be 1-64 letters"),
    ("", "device id must be 1-64 letters"),
])
def test_bad_levels(device, message):
    with pytest.raises(BadTopicName, match=message):
        Topics().request(device)


def test_bad_prefix():
    with pytest.raises(BadTopicName, match="topic prefix level"):
        Topics("a/#")
