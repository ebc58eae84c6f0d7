import { request } from "node:http";

export interface AdminReply {
  status: number;
  /** The parsed JSON reply, or the text of a text reply (metrics). */
  json: Record<string, unknown>;
  text: string;
}

/** Calls the plugin's admin API over its unix socket (docs/admin-api.md). */
export function callAdmin(socketPath: string, method: string, path: string, body?: unknown): Promise<AdminReply> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, path, method, headers: { "Content-Type": "application/json", Accept: "application/json" } }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (chunk: string) => (text += chunk));
      res.on("end", () => {
        let json: Record<string, unknown> = {};
        if ((res.headers["content-type"] ?? "").includes("json")) json = JSON.parse(text) as Record<string, unknown>;
        resolve({ status: res.statusCode ?? 0, json, text });
      });
    });
    req.on("error", reject);
    req.end(body === undefined ? undefined : JSON.stringify(body));
  });
}

/** Calls the admin API and fails with its error unless it answered 200. */
export async function adminOk(socketPath: string, method: string, path: string, body?: unknown): Promise<Record<string, unknown>> {
  const reply = await callAdmin(socketPath, method, path, body);
  if (reply.status !== 200) throw new Error(`${method} ${path} failed (${reply.status}): ${String(reply.json["error"] ?? reply.text)}`);
  return reply.json;
}
