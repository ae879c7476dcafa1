"""The in-process amqtt broker carries MQTT 3.1.1 traffic, retained messages included."""
import threading

import paho.mqtt.client as mqtt
import pytest

from tensorslm.cli.embedded_broker import BrokerStartError, EmbeddedBroker


def test_publish_subscribe_and_retained():
    with EmbeddedBroker() as broker:
        got, done = [], threading.Event()

        def on_message(client, userdata, msg):
            got.append((msg.topic, msg.payload))
            if len(got) == 2:
                done.set()

        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub", protocol=mqtt.MQTTv311)
        pub.connect(broker.host, broker.port)
        pub.loop_start()
        pub.publish("demo/status", b"online", qos=1, retain=True).wait_for_publish(5)

        sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sub", protocol=mqtt.MQTTv311)
        sub.on_message = on_message
        subscribed = threading.Event()
        sub.on_subscribe = lambda *a: subscribed.set()
        sub.connect(broker.host, broker.port)
        sub.loop_start()
        sub.subscribe("demo/#", qos=1)
        assert subscribed.wait(5)
        pub.publish("demo/request", b'{"prompt": "hi"}', qos=1).wait_for_publish(5)
        assert done.wait(5), got
        assert sorted(got) == [("demo/request", b'{"prompt": "hi"}'), ("demo/status", b"online")]
        for client in (pub, sub):
            client.loop_stop()
            client.disconnect()


def test_port_in_use_is_a_clear_error():
    with EmbeddedBroker() as first:
        with pytest.raises(BrokerStartError, match=f"could not listen on 127.0.0.1:{first.port}"):
            EmbeddedBroker(port=first.port).start()
