import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { FakeServer, pluginInspect, runCli, runCliProcess, tempDir } from "../support/cli-fakes.js";

/**
 * The command line, checked before anything is sent: both fakes (the admin API and
 * the Docker engine) are there to prove that a usage error talks to neither.
 */
let dir: Awaited<ReturnType<typeof tempDir>>;
let admin: FakeServer;
let docker: FakeServer;
let env: Record<string, string>;

before(async () => {
  dir = await tempDir();
  admin = await FakeServer.start(join(dir.path, "host", "thinvol", "admin.sock"));
  docker = await FakeServer.start(join(dir.path, "docker.sock"));
  docker.on("GET", "/plugins/thinvol:latest/json", { json: await pluginInspect({ stateSource: join(dir.path, "host") }) });
  admin.on("GET", "/v1/volumes", { json: { volumes: [] } });
  env = { DOCKER_HOST: `unix://${docker.socketPath}` };
});
after(async () => {
  await admin.close();
  await docker.close();
  await dir.remove();
});

/** Runs a line that must be refused as a usage error, and checks that nothing was asked of anyone. */
async function refused(argv: string[]): Promise<{ message: string; hint: string; stdout: string }> {
  const before = admin.requests.length + docker.requests.length;
  const r = await runCli(argv, { env });
  assert.equal(r.code, 2, `${argv.join(" ")}: ${r.stderr}`);
  assert.equal(admin.requests.length + docker.requests.length, before, `${argv.join(" ")} sent a request`);
  const [message = "", hint = "", rest = ""] = r.stderr.split("\n");
  assert.equal(rest, "", "two lines: the problem, then where to read more");
  return { message, hint, stdout: r.stdout };
}

describe("names and sizes are refused before any request", () => {
  const cases: [string[], RegExp, string][] = [
    [["resize", "bad name", "20G"], /^thinvol: invalid volume name "bad name": use 1 to 96 letters, digits, '_', '\.' or '-', starting with a letter or digit$/, "resize"],
    [["resize", "db", "20X"], /^thinvol: invalid size "20X": use a number larger than 0 with an optional unit, such as 512M, 20G or 1T$/, "resize"],
    [["resize", "db", "0"], /^thinvol: invalid size "0"/, "resize"],
    [["inspect", "../etc"], /^thinvol: invalid volume name "\.\.\/etc"/, "inspect"],
    [["inspect", "x".repeat(97)], /^thinvol: invalid volume name "x{97}"/, "inspect"],
    [["snapshot", "create", "db", ".hidden"], /^thinvol: invalid snapshot name "\.hidden"/, "snapshot create"],
    [["snapshot", "rm", "db", "a/b"], /^thinvol: invalid snapshot name "a\/b"/, "snapshot rm"],
    [["snapshot", "ls", "db?x"], /^thinvol: invalid volume name "db\?x"/, "snapshot ls"],
    [["rollback", "db", "snap shot"], /^thinvol: invalid snapshot name "snap shot"/, "rollback"],
    [["pool", "grow", "lots"], /^thinvol: invalid size "lots"/, "pool grow"],
    [["ls", "--plugin", "thin vol"], /^thinvol: invalid plugin name "thin vol"/, ""],
  ];
  for (const [argv, message, topic] of cases) {
    test(argv.join(" "), async () => {
      const r = await refused(argv);
      assert.match(r.message, message);
      assert.equal(r.hint, `see thinvol help${topic ? ` ${topic}` : ""}`);
      assert.equal(r.stdout, "");
    });
  }
});

describe("the shape of the command line", () => {
  const cases: [string[], string, string][] = [
    [[], "thinvol: no command given", "see thinvol help"],
    [["frobnicate"], 'thinvol: unknown command "frobnicate"', "see thinvol help"],
    [["snapshot"], "thinvol: missing snapshot command: use create, ls or rm", "see thinvol help snapshot"],
    [["snapshot", "delete", "db", "s"], 'thinvol: unknown snapshot command "delete": use create, ls or rm', "see thinvol help snapshot"],
    [["pool"], "thinvol: missing pool command: use grow", "see thinvol help pool"],
    [["resize", "db"], "thinvol: missing SIZE (usage: thinvol resize VOLUME SIZE)", "see thinvol help resize"],
    [["snapshot", "create"], "thinvol: missing VOLUME and NAME (usage: thinvol snapshot create VOLUME NAME)", "see thinvol help snapshot create"],
    [["inspect", "a", "b"], 'thinvol: unexpected argument "b" (usage: thinvol inspect VOLUME)', "see thinvol help inspect"],
    [["ls", "everything"], 'thinvol: unexpected argument "everything" (usage: thinvol ls)', "see thinvol help ls"],
    [["ls", "--all"], 'thinvol: unknown option "--all"', "see thinvol help ls"],
    [["snapshot", "ls", "-a"], 'thinvol: unknown option "-a"', "see thinvol help snapshot ls"],
    [["ls", "--json=yes"], "thinvol: option --json takes no value", "see thinvol help ls"],
    [["ls", "--socket"], "thinvol: option --socket needs a value", "see thinvol help ls"],
    [["--plugin"], "thinvol: option --plugin needs a value", "see thinvol help"],
    [["help", "nosuch"], 'thinvol: no help for "nosuch": no such command', "see thinvol help"],
  ];
  for (const [argv, message, hint] of cases) {
    test(`thinvol ${argv.join(" ")}`.trim(), async () => {
      const r = await refused(argv);
      assert.equal(r.message, message);
      assert.equal(r.hint, hint);
    });
  }

  test("--json prints a usage error as {error, kind: usage} on stdout too", async () => {
    const r = await refused(["resize", "db", "huge", "--json"]);
    assert.deepEqual(JSON.parse(r.stdout), { error: 'invalid size "huge": use a number larger than 0 with an optional unit, such as 512M, 20G or 1T', kind: "usage" });
    assert.match(r.message, /^thinvol: invalid size "huge"/);
  });

  test("global options may come anywhere on the line", async () => {
    for (const argv of [["--json", "ls"], ["ls", "--json"], ["--plugin", "thinvol", "ls", "--json"], ["ls", "--socket", admin.socketPath, "--json"]]) {
      const r = await runCli(argv, { env });
      assert.equal(r.code, 0, `${argv.join(" ")}: ${r.stderr}`);
      assert.deepEqual(JSON.parse(r.stdout), { volumes: [] });
    }
  });

  test("after --, a word that looks like an option is an argument", async () => {
    const r = await refused(["inspect", "--", "--json"]);
    assert.match(r.message, /^thinvol: invalid volume name "--json"/);
  });
});

describe("help and version", () => {
  test("thinvol help lists every command and the global options", async () => {
    const r = await runCli(["help"]);
    assert.equal(r.code, 0);
    for (const usage of [
      "ls",
      "df",
      "inspect VOLUME",
      "resize VOLUME SIZE",
      "snapshot create VOLUME NAME",
      "snapshot ls [VOLUME]",
      "snapshot rm VOLUME NAME",
      "rollback VOLUME SNAPSHOT",
      "pool grow SIZE",
      "metrics",
      "help [COMMAND]",
    ]) {
      assert.match(r.stdout, new RegExp(`^  ${usage.replace(/[[\]]/g, "\\$&")} {3,}\\S`, "m"), usage);
    }
    for (const option of ["--plugin NAME", "--socket PATH", "--json", "--help", "--version"]) assert.ok(r.stdout.includes(option), option);
    assert.deepEqual((await runCli(["--help"])).stdout, r.stdout);
    assert.deepEqual((await runCli(["-h"])).stdout, r.stdout);
  });

  test("thinvol help COMMAND, COMMAND --help and COMMAND -h are the same page, with an example", async () => {
    const page = await runCli(["help", "snapshot", "create"]);
    assert.equal(page.code, 0);
    assert.match(page.stdout, /^Usage: thinvol snapshot create VOLUME NAME \[OPTIONS\]\n/);
    assert.match(page.stdout, /\n {2}thinvol snapshot create db before-upgrade\n/);
    for (const argv of [["snapshot", "create", "--help"], ["snapshot", "create", "-h"], ["--help", "snapshot", "create", "db"]]) {
      const r = await runCli(argv);
      assert.equal(r.code, 0);
      assert.equal(r.stdout, page.stdout, argv.join(" "));
    }
  });

  test("every command has a help page that fits 80 columns", async () => {
    for (const name of ["ls", "df", "inspect", "resize", "snapshot create", "snapshot ls", "snapshot rm", "rollback", "pool grow", "metrics", "snapshot", "pool", ""]) {
      const r = await runCli(["help", ...name.split(" ").filter(Boolean)]);
      assert.equal(r.code, 0, name);
      for (const line of r.stdout.split("\n")) assert.ok(line.length <= 80, `${name}: ${line}`);
    }
  });

  test("a group's help lists its commands", async () => {
    const r = await runCli(["snapshot", "--help"]);
    assert.equal(r.code, 0);
    assert.match(r.stdout, /snapshot create VOLUME NAME .*\n.*snapshot ls \[VOLUME\] .*\n.*snapshot rm VOLUME NAME/);
  });

  test("--version prints the package version", async () => {
    const { version } = JSON.parse(await readFile(join(import.meta.dirname, "..", "..", "package.json"), "utf8")) as { version: string };
    const r = await runCli(["--version"]);
    assert.equal(r.code, 0);
    assert.equal(r.stdout, `thinvol ${version}\n`);
  });
});

describe("exit codes of the process", () => {
  test("--version exits 0", async () => {
    const r = await runCliProcess(["--version"]);
    assert.equal(r.code, 0);
    assert.match(r.stdout, /^thinvol \d+\.\d+\.\d+/);
  });

  test("a usage error exits 2, with the problem and a hint on stderr and nothing on stdout", async () => {
    const r = await runCliProcess(["resize", "db", "20 parsecs"]);
    assert.equal(r.code, 2);
    assert.equal(r.stdout, "");
    assert.equal(r.stderr, 'thinvol: invalid size "20 parsecs": use a number larger than 0 with an optional unit, such as 512M, 20G or 1T\nsee thinvol help resize\n');
  });
});
