// An S3 endpoint for tests, in its own process as a real one would be: s3rver on a free
// loopback port, keeping its objects in the directory given as the first argument. Prints
// `{"port":N}` on one line once it listens; exits when told to (SIGTERM) or when its
// parent goes (stdin closes).
import S3rver from "s3rver";

const directory = process.argv[2];
if (!directory) {
  console.error("usage: s3rver-main.mjs DIRECTORY");
  process.exit(2);
}
const server = new S3rver({ address: "127.0.0.1", port: 0, directory, silent: true });
const { port } = await server.run();
process.stdout.write(`${JSON.stringify({ port })}\n`);

function stop() {
  // Keep-alive sockets of the client would hold close() open; nothing is in flight any more.
  server.httpServer?.closeAllConnections?.();
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on("SIGTERM", stop);
process.stdin.on("end", stop);
process.stdin.resume();
