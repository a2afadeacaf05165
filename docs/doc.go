// Package docs holds the tests that keep the documentation in this folder
// true: the production guide's Caddyfile adapts with our modules, and every
// metric the Grafana dashboard queries exists.
package docs
