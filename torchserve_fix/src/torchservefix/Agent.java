package torchservefix;

import java.io.IOException;
import java.io.InputStream;
import java.lang.instrument.ClassFileTransformer;
import java.lang.instrument.Instrumentation;
import java.net.JarURLConnection;
import java.net.URISyntaxException;
import java.net.URL;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.security.ProtectionDomain;
import java.util.HashMap;
import java.util.HexFormat;
import java.util.Map;
import java.util.jar.Attributes;
import java.util.jar.JarEntry;
import java.util.jar.JarFile;

/**
 * A Java agent (-javaagent:torchserve-fix.jar) that makes the JVM load our replacement classes
 * instead of model-server.jar's classes of the same names, as they are loaded.
 *
 * <p>Why not the class path: torchserve starts Java with its own {@code -cp .:<ts>/frontend/*},
 * after vmargs, so a -cp in vmargs is overridden; its one earlier entry is the working directory,
 * and under KServe that directory is an emptyDir volume (deploy/kserve/servingruntime.yaml) that
 * hides whatever the image put there. An agent is given by vmargs or JAVA_TOOL_OPTIONS and does
 * not depend on the working directory.
 *
 * <p>It refuses to start the JVM when model-server.jar is not the one the classes were compiled
 * against (its SHA-256 is in this jar's manifest): never a silently unpatched or mispatched server.
 * In a JVM without TorchServe's classes (java -version) it does nothing.
 */
public final class Agent {
    private static final String RESOURCES = "torchserve_fix/replacements/";

    private Agent() {}

    public static void premain(String args, Instrumentation inst) {
        try (JarFile own = new JarFile(ownJar().toFile())) {
            Attributes manifest = own.getManifest().getMainAttributes();
            String expected = manifest.getValue("Model-Server-Jar-SHA256");
            Path jar = modelServerJar();
            if (jar == null) {
                return; // not TorchServe (e.g. java -version in the image): nothing to replace
            }
            String actual = sha256(jar);
            if (!actual.equals(expected)) {
                fail(jar + " (sha256 " + actual + ") is not the model-server.jar of TorchServe "
                        + manifest.getValue("TorchServe-Version") + " (sha256 " + expected
                        + ") that this fix replaces a class of: install that TorchServe, or port"
                        + " torchserve_fix to this one");
            }
            Map<String, byte[]> replacements = new HashMap<>();
            for (String name : manifest.getValue("Replaced-Classes").split(" ")) {
                replacements.put(name, entry(own, RESOURCES + name + ".class"));
            }
            inst.addTransformer(new Swap(replacements));
        } catch (IOException | RuntimeException e) {
            fail("cannot apply the fix: " + e);
        }
    }

    /** Gives the JVM our bytes for a replaced class when it loads the class. */
    private static final class Swap implements ClassFileTransformer {
        private final Map<String, byte[]> replacements;

        Swap(Map<String, byte[]> replacements) {
            this.replacements = replacements;
        }

        @Override
        public byte[] transform(ClassLoader loader, String className, Class<?> redefined,
                ProtectionDomain domain, byte[] original) {
            return loader == null ? null : replacements.get(className);
        }
    }

    private static Path modelServerJar() throws IOException {
        String probe = "org/pytorch/serve/wlm/ContinuousBatching.class";
        URL url = ClassLoader.getSystemClassLoader().getResource(probe);
        if (url == null) {
            return null;
        }
        if (!"jar".equals(url.getProtocol())) {
            throw new IOException(url + " comes before model-server.jar on the class path: remove it");
        }
        URL jar = ((JarURLConnection) url.openConnection()).getJarFileURL();
        try {
            return Paths.get(jar.toURI());
        } catch (URISyntaxException e) {
            throw new IOException(e);
        }
    }

    private static Path ownJar() throws IOException {
        try {
            return Paths.get(Agent.class.getProtectionDomain().getCodeSource().getLocation().toURI());
        } catch (URISyntaxException e) {
            throw new IOException(e);
        }
    }

    private static byte[] entry(JarFile jar, String name) throws IOException {
        JarEntry entry = jar.getJarEntry(name);
        if (entry == null) {
            throw new IOException(jar.getName() + " lacks " + name);
        }
        try (InputStream in = jar.getInputStream(entry)) {
            return in.readAllBytes();
        }
    }

    private static String sha256(Path file) throws IOException {
        try {
            MessageDigest digest = MessageDigest.getInstance("SHA-256");
            try (InputStream in = Files.newInputStream(file)) {
                byte[] buffer = new byte[1 << 16];
                for (int n; (n = in.read(buffer)) > 0; ) {
                    digest.update(buffer, 0, n);
                }
            }
            return HexFormat.of().formatHex(digest.digest());
        } catch (NoSuchAlgorithmException e) {
            throw new IOException(e);
        }
    }

    private static void fail(String why) {
        System.err.println("torchserve_fix: " + why);
        System.err.flush();
        System.exit(3);
    }
}
