// A Kafka Connect standalone worker without the REST server: what ConnectStandalone does, minus
// Jetty (the Debezium wheel ships a Jetty that Connect 4.3's REST server cannot use).
// usage: java -cp 'launcher:libs/*' Launcher worker.properties connector.properties...
// Exits non-zero when a connector cannot be created or fails; stops cleanly on SIGTERM.
import java.util.Map;
import java.util.concurrent.TimeUnit;

import org.apache.kafka.common.utils.Time;
import org.apache.kafka.common.utils.Utils;
import org.apache.kafka.connect.connector.policy.AllConnectorClientConfigOverridePolicy;
import org.apache.kafka.connect.json.JsonConverter;
import org.apache.kafka.connect.runtime.Worker;
import org.apache.kafka.connect.runtime.isolation.Plugins;
import org.apache.kafka.connect.runtime.rest.entities.ConnectorInfo;
import org.apache.kafka.connect.runtime.standalone.StandaloneConfig;
import org.apache.kafka.connect.runtime.standalone.StandaloneHerder;
import org.apache.kafka.connect.runtime.Herder;
import org.apache.kafka.connect.storage.FileOffsetBackingStore;
import org.apache.kafka.connect.util.FutureCallback;

public class Launcher {
    public static void main(String[] args) throws Exception {
        if (args.length < 2) {
            System.err.println("usage: Launcher worker.properties connector.properties...");
            System.exit(2);
        }
        Map<String, String> workerProps = Utils.propsToStringMap(Utils.loadProps(args[0]));
        Plugins plugins = new Plugins(workerProps);
        plugins.compareAndSwapWithDelegatingLoader();
        StandaloneConfig config = new StandaloneConfig(workerProps);
        String clusterId = config.kafkaClusterId();
        FileOffsetBackingStore offsets = new FileOffsetBackingStore(
            plugins.newInternalConverter(true, JsonConverter.class.getName(), Map.of("schemas.enable", "false")));
        offsets.configure(config);
        AllConnectorClientConfigOverridePolicy policy = new AllConnectorClientConfigOverridePolicy();
        Worker worker = new Worker("livetable-connect", Time.SYSTEM, plugins, config, offsets, policy);
        StandaloneHerder herder = new StandaloneHerder(worker, clusterId, policy);
        Runtime.getRuntime().addShutdownHook(new Thread(herder::stop));
        herder.start();
        for (int i = 1; i < args.length; i++) {
            Map<String, String> props = Utils.propsToStringMap(Utils.loadProps(args[i]));
            FutureCallback<Herder.Created<ConnectorInfo>> cb = new FutureCallback<>();
            herder.putConnectorConfig(props.get("name"), props, true, cb);
            Herder.Created<ConnectorInfo> created = cb.get(60, TimeUnit.SECONDS);
            System.err.println("livetable-connect: connector " + created.result().name() + " created");
        }
        // fail loudly if a connector or task dies, so scripts see it
        while (true) {
            Thread.sleep(1000);
            for (String name : herder.connectors()) {
                var status = herder.connectorStatus(name);
                boolean failed = "FAILED".equals(status.connector().state())
                    || status.tasks().stream().anyMatch(t -> "FAILED".equals(t.state()));
                if (failed) {
                    System.err.println("livetable-connect: connector " + name + " FAILED: " + status.connector().trace()
                        + status.tasks().stream().map(t -> " task: " + t.trace()).reduce("", String::concat));
                    System.exit(1);
                }
            }
        }
    }
}
