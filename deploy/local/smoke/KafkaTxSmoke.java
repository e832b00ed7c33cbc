// Smoke test for the local broker: transactional produce (one committed, one aborted
// transaction) to a 3-partition topic, then a read_committed consumer must see exactly
// the committed records. Run via deploy/local/smoke.sh (java source-file mode, Kafka classpath).
import java.time.Duration;
import java.util.*;
import org.apache.kafka.clients.admin.*;
import org.apache.kafka.clients.consumer.*;
import org.apache.kafka.clients.producer.*;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.errors.TopicExistsException;
import org.apache.kafka.common.serialization.*;

public class KafkaTxSmoke {
    public static void main(String[] args) throws Exception {
        String bootstrap = args[0];
        String topic = args[1];
        int n = 30;
        try (Admin admin = Admin.create(Map.of(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap))) {
            try {
                admin.createTopics(List.of(new NewTopic(topic, 3, (short) 1))).all().get();
            } catch (java.util.concurrent.ExecutionException e) {
                if (!(e.getCause() instanceof TopicExistsException)) throw e;
            }
        }
        String run = UUID.randomUUID().toString();
        Properties pp = new Properties();
        pp.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        pp.put(ProducerConfig.TRANSACTIONAL_ID_CONFIG, "pgferry-smoke-" + run);
        pp.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
        pp.put(ProducerConfig.ACKS_CONFIG, "all");
        try (Producer<String, String> p = new KafkaProducer<>(pp, new StringSerializer(), new StringSerializer())) {
            p.initTransactions();
            p.beginTransaction();
            for (int i = 0; i < n; i++) p.send(new ProducerRecord<>(topic, "k" + i, run + ":committed:" + i));
            p.commitTransaction();
            p.beginTransaction();
            for (int i = 0; i < n; i++) p.send(new ProducerRecord<>(topic, "k" + i, run + ":aborted:" + i));
            p.flush();
            p.abortTransaction();
        }
        Properties cp = new Properties();
        cp.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        cp.put(ConsumerConfig.GROUP_ID_CONFIG, "pgferry-smoke-" + run);
        cp.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        cp.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, "read_committed");
        int committed = 0, aborted = 0;
        Set<Integer> parts = new HashSet<>();
        try (Consumer<String, String> c = new KafkaConsumer<>(cp, new StringDeserializer(), new StringDeserializer())) {
            c.subscribe(List.of(topic));
            long end = System.currentTimeMillis() + 60_000;
            while (committed < n && System.currentTimeMillis() < end) {
                for (ConsumerRecord<String, String> r : c.poll(Duration.ofMillis(500))) {
                    if (!r.value().startsWith(run)) continue;
                    if (r.value().contains(":committed:")) { committed++; parts.add(r.partition()); }
                    else aborted++;
                }
            }
            // read a little longer to be sure no aborted record shows up
            for (int i = 0; i < 4; i++)
                for (ConsumerRecord<String, String> r : c.poll(Duration.ofMillis(500)))
                    if (r.value().startsWith(run) && r.value().contains(":aborted:")) aborted++;
            c.commitSync();
        }
        System.out.printf("kafka smoke: topic %s committed=%d/%d aborted_seen=%d partitions_used=%s%n",
                topic, committed, n, aborted, parts);
        if (committed != n || aborted != 0) System.exit(1);
    }
}
