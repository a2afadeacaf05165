package fakegitlab

import (
	"bytes"
	"fmt"
	"html/template"
	"io/fs"
	"mime"
	"net/http"
	"net/url"
	"path"
	"strings"
	"time"
)

// Test pages: browser tests load a page from GitLab's origin, as a user
// loads GitLab's environment pages, and that page calls the k8s proxy with
// GitLab's cookie and CSRF token. ServePages makes the Server serve such
// pages, the way Rails serves its own to a signed-in user.

// PathPages is the path under which the Server serves test pages.
const PathPages = "/-/test-pages/"

// SessionCookie is the name of GitLab's Rails session cookie. The Server
// knows a session by the value AddSession was given for the _gitlab_kas
// cookie and takes the same value in this cookie to recognise the signed-in
// user of a page request.
const SessionCookie = "_gitlab_session"

// KASCookie is the name of the cookie GitLab sets for the k8s proxy.
const KASCookie = "_gitlab_kas"

// kasCookieLifetime is how long the _gitlab_kas cookie lives: GitLab sets
// it to expire in a day (Gitlab::Kas::UserAccess.cookie_data).
const kasCookieLifetime = 24 * time.Hour

// Pages are test pages and what the Server needs to serve them as GitLab
// would.
type Pages struct {
	// Files are the pages and their assets, served under PathPages by
	// their names in Files. A file whose name ends in .html is an
	// html/template executed with the fields of PageData; other files are
	// served as they are, with the Content-Type their extension names.
	Files fs.FS
	// ExternalURL is GitLab's external URL, such as
	// https://gitlab.example.com: its host decides the cookie's domain.
	ExternalURL string
	// K8sProxyURL is the k8s proxy's URL as GitLab has it configured
	// (external_k8s_proxy_url), such as
	// https://kas.gitlab.example.com/k8s-proxy/ in a split deployment or
	// https://gitlab.example.com/-/kubernetes-agent/k8s-proxy/ when KAS
	// shares GitLab's host.
	K8sProxyURL string
}

// PageData is what an HTML page's template gets.
type PageData struct {
	// CSRFToken is the signed-in session's CSRF token, which GitLab's
	// pages carry in <meta name="csrf-token">.
	CSRFToken string
	// K8sProxyURL is Pages.K8sProxyURL.
	K8sProxyURL string
}

// ServePages makes the Server serve p's files under PathPages, replacing
// any pages served before. A GET of an HTML page needs the SessionCookie of
// a live session (AddSession); without one it is answered 401. Then, as
// Rails does on the pages that use the k8s proxy (KasCookie concern), the
// answer sets the _gitlab_kas cookie with the attributes of
// Gitlab::Kas::UserAccess.cookie_data: the session's value, HttpOnly,
// Secure (GitLab on HTTPS), a day's lifetime, the path of K8sProxyURL, and
// the domain of GitLab's host only when the proxy is on a subdomain of it
// (else a host-only cookie). SameSite is Lax, Rails' default. Requests for
// pages are not KAS's and are not counted by Calls.
func (s *Server) ServePages(p Pages) {
	s.t.Helper()
	proxy, err := url.Parse(p.K8sProxyURL)
	if err != nil || proxy.Host == "" {
		s.t.Fatalf("fakegitlab: ServePages needs an absolute K8sProxyURL, got %q", p.K8sProxyURL)
	}
	external, err := url.Parse(p.ExternalURL)
	if err != nil || external.Host == "" {
		s.t.Fatalf("fakegitlab: ServePages needs an absolute ExternalURL, got %q", p.ExternalURL)
	}
	if p.Files == nil {
		s.t.Fatalf("fakegitlab: ServePages needs Files")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pages = &p
}

// servePage answers a request under PathPages.
func (s *Server) servePage(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	p := s.pages
	s.mu.Unlock()
	name := strings.TrimPrefix(r.URL.Path, PathPages)
	if p == nil || r.Method != http.MethodGet || name == "" || !fs.ValidPath(name) {
		http.NotFound(w, r)
		return
	}
	content, err := fs.ReadFile(p.Files, name)
	if err != nil {
		http.NotFound(w, r)
		return
	}
	if path.Ext(name) != ".html" {
		w.Header().Set("Content-Type", mime.TypeByExtension(path.Ext(name)))
		_, _ = w.Write(content)
		return
	}
	var ss *session
	if c, err := r.Cookie(SessionCookie); err == nil {
		if value, err := url.QueryUnescape(c.Value); err == nil { // Rack unescapes cookie values
			ss = s.liveSession(value)
		}
	}
	if ss == nil {
		http.Error(w, "401 Unauthorized: sign in to GitLab", http.StatusUnauthorized)
		return
	}
	page, err := template.New(name).Parse(string(content))
	if err != nil {
		http.Error(w, fmt.Sprintf("fakegitlab: page %s: %v", name, err), http.StatusInternalServerError)
		return
	}
	var body bytes.Buffer
	if err := page.Execute(&body, PageData{CSRFToken: ss.csrf, K8sProxyURL: p.K8sProxyURL}); err != nil {
		http.Error(w, fmt.Sprintf("fakegitlab: page %s: %v", name, err), http.StatusInternalServerError)
		return
	}
	http.SetCookie(w, kasCookie(p, ss.cookie))
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write(body.Bytes())
}

// kasCookie is the _gitlab_kas cookie Rails sets for a session
// (Gitlab::Kas::UserAccess.cookie_data).
func kasCookie(p *Pages, value string) *http.Cookie {
	proxy, _ := url.Parse(p.K8sProxyURL)    // checked by ServePages
	external, _ := url.Parse(p.ExternalURL) // checked by ServePages
	c := &http.Cookie{
		Name:     KASCookie,
		Value:    url.QueryEscape(value), // Rack escapes cookie values
		Path:     proxy.Path,
		Expires:  time.Now().Add(kasCookieLifetime),
		HttpOnly: true,
		Secure:   true,
		SameSite: http.SameSiteLaxMode,
	}
	if c.Path == "" {
		c.Path = "/"
	}
	if gitlabHost := external.Hostname(); strings.HasSuffix(proxy.Hostname(), "."+gitlabHost) {
		c.Domain = gitlabHost
	}
	return c
}

// liveSession is the session whose cookie is value, unless it is unknown
// or expired. A session's cookie and CSRF token never change, so the caller
// reads them without the lock.
func (s *Server) liveSession(value string) *session {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, ss := range s.sessions {
		if ss.cookie == value && !ss.expired {
			return ss
		}
	}
	return nil
}
