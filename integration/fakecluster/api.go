package fakecluster

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// apiCallTimeout bounds one call of the Cluster to the real apiserver.
const apiCallTimeout = 30 * time.Second

// credentials are the headers that say who a request is from: Authorization
// and the Impersonate-* headers.
type credentials http.Header

// credentialsOf takes the credentials of a client's request.
func credentialsOf(r *http.Request) credentials {
	creds := credentials{}
	for name, values := range r.Header {
		if name == "Authorization" || strings.HasPrefix(name, "Impersonate-") {
			creds[name] = append([]string(nil), values...)
		}
	}
	return creds
}

// bearer are the credentials of a bearer token.
func bearer(token string) credentials {
	return credentials{"Authorization": {"Bearer " + token}}
}

// withoutCredentials removes the credentials from h, as the apiserver's
// authentication and impersonation filters do before a request goes on.
func withoutCredentials(h http.Header) {
	for name := range h {
		if name == "Authorization" || strings.HasPrefix(name, "Impersonate-") {
			delete(h, name)
		}
	}
}

// apiCall sends a JSON request to the real apiserver. A response that is
// not a success becomes an *apierrors.StatusError, decoded from the
// apiserver's Status when it sent one.
func (c *Cluster) apiCall(ctx context.Context, creds credentials, method, path string, in, out any) error {
	ctx, cancel := context.WithTimeout(ctx, apiCallTimeout)
	defer cancel()
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return fmt.Errorf("fakecluster: encode %s %s: %w", method, path, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.apiURL.JoinPath(path).String(), body)
	if err != nil {
		return fmt.Errorf("fakecluster: %w", err)
	}
	for name, values := range creds {
		req.Header[name] = values
	}
	req.Header.Set("Accept", "application/json")
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.apiTransport.RoundTrip(req)
	if err != nil {
		return apierrors.NewInternalError(fmt.Errorf("fakecluster: %s %s on the kube-apiserver: %w", method, path, err))
	}
	defer resp.Body.Close()
	respBody, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return apierrors.NewInternalError(fmt.Errorf("fakecluster: read the answer to %s %s: %w", method, path, err))
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		var status metav1.Status
		if json.Unmarshal(respBody, &status) == nil && status.Kind == "Status" {
			if status.Code == 0 {
				status.Code = int32(resp.StatusCode)
			}
			return &apierrors.StatusError{ErrStatus: status}
		}
		return &apierrors.StatusError{ErrStatus: metav1.Status{
			Status:  metav1.StatusFailure,
			Code:    int32(resp.StatusCode),
			Reason:  reasonForCode(resp.StatusCode),
			Message: fmt.Sprintf("%s %s: %s: %s", method, path, resp.Status, strings.TrimSpace(string(respBody))),
		}}
	}
	if out != nil {
		if err := json.Unmarshal(respBody, out); err != nil {
			return apierrors.NewInternalError(fmt.Errorf("fakecluster: decode the answer to %s %s: %w", method, path, err))
		}
	}
	return nil
}

func reasonForCode(code int) metav1.StatusReason {
	switch code {
	case http.StatusUnauthorized:
		return metav1.StatusReasonUnauthorized
	case http.StatusForbidden:
		return metav1.StatusReasonForbidden
	case http.StatusNotFound:
		return metav1.StatusReasonNotFound
	case http.StatusConflict:
		return metav1.StatusReasonConflict
	case http.StatusBadRequest:
		return metav1.StatusReasonBadRequest
	}
	return metav1.StatusReasonUnknown
}

// writeStatus answers with err as a Status, as the apiserver does.
func writeStatus(w http.ResponseWriter, err error) {
	var status metav1.Status
	var apiStatus apierrors.APIStatus
	if errors.As(err, &apiStatus) {
		status = apiStatus.Status()
	} else {
		status = apierrors.NewInternalError(err).ErrStatus
	}
	status.Kind, status.APIVersion = "Status", "v1"
	if status.Code == 0 {
		status.Code = http.StatusInternalServerError
	}
	body, _ := json.Marshal(status)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(int(status.Code))
	_, _ = w.Write(body)
}

// errorResponder is the UpgradeAwareHandler's ErrorResponder: errors become
// Status answers.
type errorResponder struct{}

func (errorResponder) Error(w http.ResponseWriter, _ *http.Request, err error) { writeStatus(w, err) }
