// A small water-quality OPC-UA server built on node-opcua: the independent peer of
// tests/test_opcua.py. It is deliberately not our simulator, so that the subscriber is checked
// against a server nobody here wrote.
//
// Configuration by environment (all optional except PEER_PORT and PEER_PKI):
//   PEER_PORT        TCP port, bound on 127.0.0.1 only
//   PEER_PKI         folder for the server's certificate store (own/, trusted/, rejected/)
//   PEER_USER / PEER_PASSWORD   when set, anonymous sessions are refused and this user is required
//   PEER_TRUST       DER/PEM certificate of the client to trust (secure endpoints)
//   PEER_INTERVAL_MS how often each variable changes (default 200)
//
// Every value it publishes is printed as one JSON line on stdout ({"node", "ts", "v", "status"}),
// the ground truth the test compares stored rows with; so is every activated session
// ({"session": {"user", "mode", "policy"}}). {"ready": ...} says it listens; node-opcua's
// own log lines also go to stdout and are not JSON.
import fs from "node:fs";
import path from "node:path";
import {
    DataType,
    MessageSecurityMode,
    OPCUACertificateManager,
    OPCUAServer,
    SecurityPolicy,
    StatusCodes,
} from "node-opcua";

const port = Number(process.env.PEER_PORT);
const pki = process.env.PEER_PKI;
const user = process.env.PEER_USER || "";
const password = process.env.PEER_PASSWORD || "";
const trust = process.env.PEER_TRUST || "";
const intervalMs = Number(process.env.PEER_INTERVAL_MS || "200");
if (!port || !pki) {
    console.error("PEER_PORT and PEER_PKI are required");
    process.exit(2);
}

const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

async function main() {
    const serverCertificateManager = new OPCUACertificateManager({
        rootFolder: path.join(pki, "server"),
        automaticallyAcceptUnknownCertificate: false,
    });
    await serverCertificateManager.initialize();
    if (trust) {
        await serverCertificateManager.trustCertificate(fs.readFileSync(trust));
    }
    const userManager = user
        ? { isValidUser: (name, pass) => name === user && pass === password }
        : undefined;
    const server = new OPCUAServer({
        host: "127.0.0.1",
        hostname: "127.0.0.1",
        port,
        serverCertificateManager,
        userCertificateManager: new OPCUACertificateManager({
            rootFolder: path.join(pki, "user"),
            automaticallyAcceptUnknownCertificate: false,
        }),
        securityPolicies: [SecurityPolicy.None, SecurityPolicy.Basic256Sha256],
        securityModes: [
            MessageSecurityMode.None,
            MessageSecurityMode.Sign,
            MessageSecurityMode.SignAndEncrypt,
        ],
        allowAnonymous: !user,
        userManager,
        isAuditing: false,
        registerServerMethod: 1,
        buildInfo: { productName: "aquameter-peer-wq", softwareVersion: "1.0.0" },
    });
    await server.initialize();

    const addressSpace = server.engine.addressSpace;
    const ns = addressSpace.getOwnNamespace();
    const station = ns.addObject({
        organizedBy: addressSpace.rootFolder.objects,
        browseName: "PeerStation",
    });
    const specs = [
        { name: "Turbidity", base: 0.3, amp: 0.05 },
        { name: "pH", base: 7.3, amp: 0.05 },
        { name: "FreeChlorine", base: 0.7, amp: 0.05, statuses: true },
    ];
    const vars = specs.map((spec) => ({
        spec,
        nodeId: `ns=${ns.index};s=PEER.${spec.name}`,
        variable: ns.addVariable({
            componentOf: station,
            nodeId: `s=PEER.${spec.name}`,
            browseName: spec.name,
            dataType: "Double",
            minimumSamplingInterval: 50,
            value: { dataType: DataType.Double, value: spec.base },
        }),
    }));

    let tick = 0;
    const update = () => {
        tick += 1;
        const now = new Date();
        for (const { spec, nodeId, variable } of vars) {
            // Distinct per tick (a sawtooth plus a small sine), so a lost or repeated sample shows.
            const v = Number(
                (spec.base + spec.amp * Math.sin(tick / 7) + (tick % 10) * 0.001).toFixed(6),
            );
            let status = StatusCodes.Good;
            if (spec.statuses && tick % 5 === 0) status = StatusCodes.UncertainLastUsableValue;
            if (spec.statuses && tick % 7 === 0) status = StatusCodes.BadSensorFailure;
            variable.setValueFromSource({ dataType: DataType.Double, value: v }, status, now);
            out({ node: nodeId, ts: now.getTime(), v, status: status.name });
        }
    };

    // Who connected and how: the test checks that the secure case really was SignAndEncrypt.
    server.on("session_activated", (session) => {
        const token = session.userIdentityToken;
        out({
            session: {
                user: token && token.userName ? token.userName : null,
                mode: MessageSecurityMode[session.channel.securityMode],
                policy: String(session.channel.securityPolicy),
            },
        });
    });

    update(); // the first published values are printed too, before any client can read them
    await server.start();
    out({
        ready: true,
        port,
        ns: ns.index,
        endpoint: server.getEndpointUrl(),
        nodes: vars.map((x) => x.nodeId),
    });
    const timer = setInterval(update, intervalMs);

    const stop = async () => {
        clearInterval(timer);
        await server.shutdown(0);
        process.exit(0);
    };
    process.on("SIGTERM", stop);
    process.on("SIGINT", stop);
}

main().catch((err) => {
    console.error(err);
    process.exit(1);
});
