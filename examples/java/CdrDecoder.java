import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStreamReader;
import java.nio.file.DirectoryStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.HexFormat;
import org.apache.avro.Schema;
import org.apache.avro.generic.GenericData;
import org.apache.avro.generic.GenericRecord;
import org.apache.avro.message.BinaryMessageDecoder;
import org.apache.avro.message.SchemaStore;

/** Decodes cdr-streamer events of any released schema version (Avro single-object encoding). */
public final class CdrDecoder {
    // README: begin
    private final BinaryMessageDecoder<GenericRecord> decoder;

    /** released: your copy of schemas/released/; reader: the .avsc your code was written for. */
    public CdrDecoder(Path released, Path reader) throws IOException {
        SchemaStore.Cache writers = new SchemaStore.Cache(); // writer schemas by fingerprint
        try (DirectoryStream<Path> files = Files.newDirectoryStream(released, "*.avsc")) {
            for (Path file : files) {
                writers.addSchema(new Schema.Parser().parse(file.toFile()));
            }
        }
        Schema readerSchema = new Schema.Parser().parse(reader.toFile());
        decoder = new BinaryMessageDecoder<>(GenericData.get(), readerSchema, writers);
    }

    /** A Kafka record's value; an unknown fingerprint throws MissingSchemaException. */
    public GenericRecord decode(byte[] value) throws IOException {
        return decoder.decode(value); // strings are java.lang.String: "avro.java.string"
    }
    // README: end

    /** For tests/integration/test_consumer_snippets.py: hex events on stdin, one a line. */
    public static void main(String[] args) throws IOException {
        CdrDecoder cdrs = new CdrDecoder(Path.of(args[0]), Path.of(args[1]));
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        for (String line = in.readLine(); line != null; line = in.readLine()) {
            GenericRecord cdr = cdrs.decode(HexFormat.of().parseHex(line.strip()));
            Object status = cdr.get("Status");
            System.out.println(cdr.get("ID") + "\t" + status + "\t" + status.getClass().getName()
                + "\t" + status.equals("Ok") + "\t" + cdr.get("AccountCode")
                + "\t" + (cdr.getSchema().getField("Tariff") == null ? "-" : cdr.get("Tariff")));
        }
    }
}
