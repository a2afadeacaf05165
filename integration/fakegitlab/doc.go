// Package fakegitlab is a test stand-in for the part of GitLab Rails that
// KAS calls: the internal REST API under /api/v4/internal/kubernetes/ and
// the CI job endpoint /api/v4/job/allowed_agents.
//
// A Server is an httptest server on 127.0.0.1, plain HTTP (Start) or HTTPS
// with the httptest certificate (StartTLS; CAFile is then the CA to give
// KAS as "the CA for GitLab"). It is closed when the test ends. A Server
// runs under a TB: a test, or a harness of its own such as the benchmark's,
// which puts GitLab's KAS in front of it.
//
// It answers the way Rails does and holds KAS to the contract to the
// letter. Where Rails would merely answer an error, a request that breaks
// the contract also fails the test, with t.Errorf and a message that says
// what was wrong, because our KAS must never send one:
//
//   - Every internal endpoint requires the KAS to GitLab JWT in header
//     Gitlab-Kas-Api-Request: HS256 (no other algorithm), signed with the
//     shared secret, iss "gitlab-kas", aud "gitlab", and exp, nbf and iat
//     present, exp not passed and at most 30 s (plus a few seconds of
//     slack) ahead, nbf and iat not in the future beyond that slack. A
//     missing or bad JWT is answered 401 {"message":"KAS JWT authentication
//     invalid"}, as Rails' Gitlab::Kas.verify_api_request does.
//   - GET agent_info takes the agent token in "Authorization: Bearer
//     <token>" or, as newer Rails also accepts, "Gitlab-Agentk-Api-Request:
//     <token>". An unknown or revoked token is a legitimate 401; a missing
//     token is a contract violation.
//   - GET /api/v4/job/allowed_agents takes the CI job token in header
//     Job-Token and must carry neither the KAS JWT nor an Authorization
//     header (Rails would ignore both, so the answer is as usual). An
//     unknown job token is a legitimate 401; a missing one is a contract
//     violation.
//   - POST agent_configuration takes exactly {agent_id, agent_config},
//     agent_config being the agent's configuration file as a JSON object;
//     it is answered 204, or 404 for an agent GitLab does not have.
//   - POST authorize_proxy_user takes exactly {agent_id, access_type,
//     access_key, csrf_token} as JSON, csrf_token being required for
//     session cookies and empty or absent for personal access tokens.
//     agent_id is a JSON integer or, as GitLab's KAS sends it, a string
//     Rails reads as one ("agent_id":"1"). A
//     credential the Server does not know (or a CSRF token that does not
//     match a known cookie) is a legitimate 401.
//   - POST usage_metrics takes {counters, unique_counters} with the counter
//     names KAS is documented to report; the Server answers 204 and keeps
//     each report (UsageReports).
//   - Any other path is answered 404 and any other method 405, and both fail
//     the test; so does a query string, which none of the endpoints takes.
//
// Access is decided as Rails decides it, never granted by a test: the
// Server holds groups, projects, users with their memberships, personal
// access tokens and sessions (AddGroup, AddProject, AddUser, AddMember,
// AddPersonalAccessToken, AddSession), agents and jobs, and the last
// configuration KAS posted for each agent. authorize_proxy_user grants a
// user who is a member, Developer or above, of a project or group the
// agent's user_access lists, with that section's access_as; allowed_agents
// lists the agents whose ci_access names the job's project or one of its
// groups (environments filtering), and the agents of the job's own
// project. Entries naming projects or groups outside the root namespace of
// the agent's configuration project count for nothing. An agent whose
// configuration KAS never posted authorizes nobody but its own project's
// jobs. Agents of projects added with a repository (Options.Gitaly) are
// answered in agent_info with the Gitaly double's address and token, so
// that KAS reads their configuration from a real git repository.
//
// Calls counts, per endpoint, the requests that met the contract (whatever
// the answer), and SetFailure makes an endpoint answer with an error status
// after those checks, to test how KAS copes with a failing GitLab.
//
// ServePages serves test pages under PathPages from GitLab's origin, as
// Rails serves its pages to a signed-in user (the _gitlab_session cookie
// of a session added with AddSession): an HTML page gets the session's
// CSRF token and the k8s proxy's URL filled in, and its answer sets the
// _gitlab_kas cookie with the attributes Rails gives it. Browser tests load
// such a page, which then calls the k8s proxy as GitLab's frontend does.
//
// Failure messages never show agent tokens, job tokens, access keys or JWTs.
package fakegitlab
