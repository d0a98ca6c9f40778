// A fault-injecting TCP proxy between a client and the gateway: forwards
// every connection to a target (which a test may change, e.g. to a
// restarted gateway's new port) and, on command, breaks connections the way
// real networks do:
//   cutAll()             reset every current connection (RST, not FIN)
//   stall() / unstall()  stop reading in both directions on the current
//                        connections: bytes wait in the kernel buffers and
//                        the sender feels backpressure; new ones flow
//   stallTowardsClient() stop only what the server sends
//   refuse(true|false)   accept and at once reset new connections
import net from "node:net";

/**
 * Resets a socket (RST, not FIN) once it is connected; one still connecting
 * is just destroyed (a reset of a connecting socket can spin in Node 20).
 */
function rst(sock) {
  if (sock.destroyed) return;
  if (sock.connecting || sock.pending) sock.destroy();
  else sock.resetAndDestroy();
}

export async function startProxy(targetPort, targetHost = "127.0.0.1") {
  const conns = new Set();
  let target = { host: targetHost, port: targetPort };
  let refusing = false;
  let accepted = 0;

  const server = net.createServer((client) => {
    accepted += 1;
    if (refusing) {
      client.destroy();
      return;
    }
    const upstream = net.connect(target.port, target.host);
    const conn = { client, upstream };
    conns.add(conn);
    // A stall holds the connections open at the time; new ones flow (a
    // path that black-holed and a reconnect that finds another).
    const apply = () => {
      if (conn.stalledUp) client.pause();
      else client.resume();
      if (conn.stalledDown) upstream.pause();
      else upstream.resume();
    };
    client.on("data", (d) => {
      if (!upstream.write(d)) client.pause();
    });
    upstream.on("data", (d) => {
      if (!client.write(d)) upstream.pause();
    });
    upstream.on("drain", () => !conn.stalledUp && client.resume());
    client.on("drain", () => !conn.stalledDown && upstream.resume());
    const end = () => {
      conns.delete(conn);
      rst(client);
      rst(upstream);
    };
    client.on("error", end);
    upstream.on("error", end);
    client.on("close", end);
    upstream.on("close", end);
    conn.apply = apply;
    conn.stalledUp = false;
    conn.stalledDown = false;
  });
  await new Promise((res) => server.listen(0, "127.0.0.1", res));
  const port = server.address().port;
  const applyAll = () => conns.forEach((c) => c.apply?.());
  return {
    port,
    url: (path = "") => `ws://127.0.0.1:${port}${path}`,
    get accepted() {
      return accepted;
    },
    get open() {
      return conns.size;
    },
    setTarget(p, h = "127.0.0.1") {
      target = { host: h, port: p };
    },
    cutAll() {
      for (const c of [...conns]) {
        conns.delete(c);
        rst(c.client);
        rst(c.upstream);
      }
    },
    /** Stops forwarding on every current connection, both ways. */
    stall() {
      conns.forEach((c) => ((c.stalledUp = true), (c.stalledDown = true)));
      applyAll();
    },
    /** Stops forwarding what the server sends, on every current connection. */
    stallTowardsClient() {
      conns.forEach((c) => (c.stalledDown = true));
      applyAll();
    },
    unstall() {
      conns.forEach((c) => ((c.stalledUp = false), (c.stalledDown = false)));
      applyAll();
    },
    refuse(on) {
      refusing = on;
    },
    async close() {
      this.cutAll();
      await new Promise((res) => server.close(res));
    },
  };
}
