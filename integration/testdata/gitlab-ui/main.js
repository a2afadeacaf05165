// The test page of the browser tests (integration/browser_test.go): it calls
// the k8s proxy the way GitLab's frontend does, with GitLab's own client
// (@gitlab/cluster-client): the Configuration carries GitLab-Agent-Id, the
// page's CSRF token (from <meta name="csrf-token">, as GitLab's pages have
// it) and credentials: "include", so that the browser sends the _gitlab_kas
// cookie GitLab set for the proxy's URL.
//
// Each action renders what it got into the page, so that a screenshot shows
// it, and records it in window.kasPage.state, which the test reads. Errors
// are recorded as the page can show them: a Kubernetes Status when the
// proxy answered with one, or the browser's network error when it refused
// the answer (CORS).

import {
  BaseAPI,
  Configuration,
  CoreV1Api,
  EVENT_DATA,
  EVENT_ERROR,
  EVENT_PLAIN_TEXT,
  EVENT_TERMINATE,
  EVENT_TIMEOUT,
  ResponseError,
  WatchApi,
} from "@gitlab/cluster-client";

const meta = (name) => document.querySelector(`meta[name="${name}"]`)?.content ?? "";
const params = new URLSearchParams(window.location.search);

const state = {
  origin: window.location.origin,
  proxyURL: meta("k8s-proxy-url"),
  agentID: params.get("agent") ?? "",
  namespaces: null,
  pods: null,
  identity: null,
  watch: { names: [], events: [], error: null }, // events: {name, at}
  log: { lines: [], error: null, terminated: false }, // lines: {text, at}
  errors: {}, // by action
};

// now is the wall clock in milliseconds, with the resolution of the
// performance timer, so that the test can compare it with its own clock.
const now = () => performance.timeOrigin + performance.now();

// configuration is the client's Configuration as GitLab's frontend builds
// it; withCSRF false leaves the CSRF token out.
function configuration({ withCSRF = true } = {}) {
  const headers = {
    "GitLab-Agent-Id": state.agentID,
    "Content-Type": "application/json",
    Accept: "application/json",
  };
  if (withCSRF) {
    headers["X-CSRF-Token"] = meta("csrf-token");
  }
  return new Configuration({ basePath: state.proxyURL.replace(/\/$/, ""), headers, credentials: "include" });
}

// describeError turns what the client threw into what the page shows.
async function describeError(err) {
  if (err instanceof ResponseError || err?.response) {
    const text = await err.response.text();
    let status = null;
    try {
      status = JSON.parse(text);
    } catch {
      // not JSON: shown as text
    }
    return { kind: "status", httpStatus: err.response.status, status, text };
  }
  const cause = err?.cause ?? err;
  return { kind: "network", name: cause?.name ?? "", message: String(cause?.message ?? cause) };
}

function render(id, lines) {
  const list = document.getElementById(id);
  list.replaceChildren(
    ...lines.map((text) => {
      const item = document.createElement("li");
      item.textContent = text;
      return item;
    }),
  );
}

function renderError(action, error) {
  state.errors[action] = error;
  const box = document.getElementById("errors");
  const item = document.createElement("li");
  item.textContent =
    error.kind === "status" && error.status
      ? `${action}: ${error.status.code} ${error.status.reason ?? ""}: ${error.status.message}`
      : `${action}: ${error.kind} ${error.name ?? ""} ${error.message ?? error.text ?? ""}`;
  box.append(item);
}

// run records the result of one action, or its error, and never throws:
// the test reads state.
async function run(action, fn) {
  delete state.errors[action];
  try {
    return await fn();
  } catch (err) {
    renderError(action, await describeError(err));
    return null;
  }
}

// IdentityApi posts a SelfSubjectReview, which the client has no method
// for, through the client's own request path and Configuration.
class IdentityApi extends BaseAPI {
  async review() {
    const response = await this.request({
      path: "/apis/authentication.k8s.io/v1/selfsubjectreviews",
      method: "POST",
      headers: {},
      body: { apiVersion: "authentication.k8s.io/v1", kind: "SelfSubjectReview" },
    });
    return response.json();
  }
}

window.kasPage = {
  state,

  listNamespaces: (options) =>
    run("namespaces", async () => {
      const list = await new CoreV1Api(configuration(options)).listCoreV1Namespace();
      state.namespaces = list.items.map((ns) => ns.metadata.name);
      render("namespaces", state.namespaces);
      return state.namespaces;
    }),

  listPods: (namespace) =>
    run("pods", async () => {
      const list = await new CoreV1Api(configuration()).listCoreV1NamespacedPod({ namespace });
      state.pods = list.items.map((pod) => `${pod.metadata.name} ${pod.status?.phase ?? ""}`);
      render("pods", state.pods);
      return state.pods;
    }),

  whoami: () =>
    run("identity", async () => {
      const review = await new IdentityApi(configuration()).review();
      state.identity = review.status.userInfo;
      document.getElementById("identity").textContent = state.identity.username;
      return state.identity;
    }),

  // watchConfigMaps opens a watch as GitLab's environment pages do
  // (WatchApi.subscribeToStream with watch=true) and records each event's
  // arrival.
  watchConfigMaps: (namespace) =>
    run("watch", async () => {
      const watcher = new WatchApi(configuration());
      watcher.on(EVENT_DATA, (objects) => {
        const at = now();
        const names = objects.map((o) => o.metadata.name);
        for (const name of names) {
          if (!state.watch.names.includes(name)) {
            state.watch.events.push({ name, at });
          }
        }
        state.watch.names = names;
        render("watch", state.watch.events.map((e) => `${e.name} (event at ${new Date(e.at).toISOString()})`));
      });
      const onError = (err) => {
        state.watch.error = err?.message ?? String(err);
        renderError("watch", { kind: "stream", message: state.watch.error });
      };
      watcher.on(EVENT_ERROR, onError);
      watcher.on(EVENT_TIMEOUT, onError);
      await watcher.subscribeToStream(`/api/v1/namespaces/${namespace}/configmaps`, { watch: true });
      return true;
    }),

  // followLog reads a container's log as GitLab's log viewer does: the
  // plain-text stream of WatchApi with follow=true, one event a line.
  followLog: (namespace, pod) =>
    run("log", async () => {
      const watcher = new WatchApi(configuration());
      const list = document.getElementById("log");
      watcher.on(EVENT_PLAIN_TEXT, (text) => {
        state.log.lines.push({ text, at: now() });
        const item = document.createElement("li");
        item.textContent = text;
        list.append(item);
      });
      watcher.on(EVENT_ERROR, (err) => {
        state.log.error = err?.message ?? String(err);
      });
      watcher.on(EVENT_TERMINATE, () => {
        state.log.terminated = true;
      });
      await watcher.subscribeToStream(`/api/v1/namespaces/${namespace}/pods/${pod}/log`, { follow: true });
      return true;
    }),

  // simpleGet is a credentialed GET that needs no preflight: the agent id
  // and CSRF token in the query, as GitLab's pages send them where they
  // cannot set headers (WebSockets). It shows that the proxy itself refuses
  // a request from another origin, not only the browser.
  simpleGet: (path) =>
    run("simpleGet", async () => {
      const url = new URL(state.proxyURL.replace(/\/$/, "") + path);
      url.searchParams.set("gitlab-agent-id", state.agentID);
      url.searchParams.set("gitlab-csrf-token", meta("csrf-token"));
      const response = await fetch(url, { credentials: "include" });
      if (!response.ok) {
        throw new ResponseError(response, "response returned an error code");
      }
      return response.status;
    }),
};

document.getElementById("origin").textContent = state.origin;
document.getElementById("proxy").textContent = state.proxyURL;
