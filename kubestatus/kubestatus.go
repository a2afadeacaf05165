// Package kubestatus writes errors the way the Kubernetes API does: as a
// metav1.Status object, so that kubectl and client libraries show the
// message instead of "unknown error" (kas-spec §1.2).
package kubestatus

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
)

// MessagePrefix starts the message of every error that the agent server or
// agent makes itself, as GitLab's KAS does, so that users can tell them
// from errors of the cluster.
const MessagePrefix = "GitLab Agent Server: "

// Status is the wire form of a Kubernetes metav1.Status failure.
type Status struct {
	Kind       string         `json:"kind"`
	APIVersion string         `json:"apiVersion"`
	Metadata   struct{}       `json:"metadata"`
	Status     string         `json:"status"`
	Message    string         `json:"message"`
	Reason     string         `json:"reason,omitempty"`
	Details    *StatusDetails `json:"details,omitempty"`
	Code       int            `json:"code"`
}

// StatusDetails is the optional details part of a Status.
type StatusDetails struct {
	// RetryAfterSeconds tells clients when to retry (also sent as the
	// Retry-After header).
	RetryAfterSeconds int `json:"retryAfterSeconds,omitempty"`
}

// reasons maps HTTP status codes to Kubernetes StatusReason values
// (k8s.io/apimachinery/pkg/apis/meta/v1 types.go). Codes without a reason
// there (502) get none, as the apiserver does.
var reasons = map[int]string{
	http.StatusBadRequest:            "BadRequest",
	http.StatusUnauthorized:          "Unauthorized",
	http.StatusForbidden:             "Forbidden",
	http.StatusNotFound:              "NotFound",
	http.StatusMethodNotAllowed:      "MethodNotAllowed",
	http.StatusConflict:              "Conflict",
	http.StatusRequestEntityTooLarge: "RequestEntityTooLarge",
	http.StatusTooManyRequests:       "TooManyRequests",
	http.StatusInternalServerError:   "InternalError",
	http.StatusServiceUnavailable:    "ServiceUnavailable",
	http.StatusGatewayTimeout:        "Timeout",
}

// New returns the Status for an HTTP code and a message; the message gets
// [MessagePrefix].
func New(code int, message string) *Status {
	return &Status{
		Kind:       "Status",
		APIVersion: "v1",
		Status:     "Failure",
		Message:    MessagePrefix + message,
		Reason:     reasons[code],
		Code:       code,
	}
}

// Write sends s as the response. Headers already set on w (such as
// Gitlab-Unauthorized or Retry-After) are kept.
func Write(w http.ResponseWriter, s *Status) {
	body, err := json.Marshal(s)
	if err != nil {
		// Only strings and numbers: cannot fail.
		panic("kubestatus: " + err.Error())
	}
	send(w, s, "application/json", body)
}

// send answers with the code of s and body.
func send(w http.ResponseWriter, s *Status, contentType string, body []byte) {
	h := w.Header()
	h.Set("Content-Type", contentType)
	h.Set("Content-Length", strconv.Itoa(len(body)))
	h.Set("X-Content-Type-Options", "nosniff")
	if s.Details != nil && s.Details.RetryAfterSeconds > 0 {
		h.Set("Retry-After", strconv.Itoa(s.Details.RetryAfterSeconds))
	}
	w.WriteHeader(s.Code)
	w.Write(body)
}

// Error writes a Status with code and message.
func Error(w http.ResponseWriter, code int, message string) {
	Write(w, New(code, message))
}

// ReadsRaw reports whether Kubernetes' Go client, and so kubectl, reads
// the answers to requests for the cluster path without looking for a
// Status in an error: discovery (/api, /apis), /version and the OpenAPI
// documents (/openapi/v2, /openapi/v3 and below) are read with
// rest.Result.Raw, which takes the message of an error from a text/* body
// only and shows "unknown" for a JSON one. kubectl discovers before
// anything else, so without a way past this no error of the agent server
// would reach its user.
func ReadsRaw(path string) bool {
	switch path {
	case "/api", "/apis", "/version", "/openapi/v2", "/openapi/v3":
		return true
	}
	return strings.HasPrefix(path, "/openapi/v3/")
}

// WriteText sends the message of s as a plain-text response with the code
// of s, for clients that show such a body but cannot decode a Status (see
// [ReadsRaw]).
func WriteText(w http.ResponseWriter, s *Status) {
	send(w, s, "text/plain; charset=utf-8", []byte(s.Message+"\n"))
}

// WriteFor sends s in the form that the clients of a request for the
// cluster path can show: plain text where Kubernetes' Go client reads
// answers raw ([ReadsRaw]), else a JSON Status.
func WriteFor(w http.ResponseWriter, path string, s *Status) {
	if ReadsRaw(path) {
		WriteText(w, s)
		return
	}
	Write(w, s)
}
