// Package redisregistry shares, through Redis, which node holds tunnels of
// which agent, and which agent connections there are, between several
// nodes serving the same agents. It is modelled on GitLab's KAS
// (kas-spec §5.1), with the same TTL and refresh defaults (5 and 4
// minutes), and works unchanged on a single Redis, behind Sentinel and on
// Redis Cluster: no command names two keys, so no key needs a hash tag.
//
// # Keys
//
// With the default prefix "caddy-kas" (p below); ids are decimal:
//
//	p:tunnel_tracker:kas_by_agent_id:<agent id>     HASH  own URL → expiry
//	p:agent_tracker:conn_by_agent_id:<agent id>     HASH  connection → expiry and connection
//	p:agent_tracker:conn_by_project_id:<project id> HASH  connection → expiry and connection
//	p:agent_tracker:connected_agents                HASH  agent id → expiry
//	p:agent_limit:<token key>:<minute of the hour>  STRING counter, expires after 59 s
//	p:tunnel_events                                 pub/sub channel
//
// An expiry is a time in Unix milliseconds, as decimal text. A connection
// value is JSON: its expiry and the [Connection]. A connection's field is
// the registry instance's random id and a sequence number, not the
// agent's connection id: agents choose that, and two tunnels (of one pod,
// or of a misbehaving agent) must not overwrite each other's entry. GitLab
// keys its hashes by the id's 8 bytes in little-endian order; decimal text
// keeps the keys readable in redis-cli.
//
// Each node writes its fields with an expiry of now + TTL and sets the
// key's expiry (PEXPIRE) to TTL, every Refresh. Readers ignore expired
// fields, so the entries of a node that died stop counting after TTL even
// where other nodes keep the key alive; a periodic collection (every
// 2×TTL, as GitLab's 10 minutes for a TTL of 5) deletes such fields from
// the keys this node writes. A key nobody refreshes expires as a whole.
//
// # Events
//
// A node publishes on the events channel, after the writes they announce,
// which agents it gained or lost a tunnel of (JSON: node and agent ids).
// Every node subscribes; an event wakes the requests waiting for those
// agents at once. The channel is prefixed, unlike GitLab's kas_events, so
// that several installations can share one Redis. Plain PUBLISH and
// SUBSCRIBE reach every node of a Redis Cluster.
//
// # Failures
//
// Writes never block the caller: they go to the registry's writer
// goroutine, which derives them from what this node holds at the time, so
// nothing is lost while Redis is down and the writer rewrites everything
// as soon as it answers again. Reads fail within a bounded time with an
// error wrapping [ErrUnavailable]. Errors are logged once per interval
// with their count.
//
// The Redis client belongs to the caller (it survives a configuration
// reload); the registry never closes it. Its operations are bounded by
// contexts with deadlines, which the client honours only with
// ContextTimeoutEnabled set, or short dial, read and write timeouts.
//
// This package imports no Caddy package.
package redisregistry
