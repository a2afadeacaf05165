package gitlab

import (
	"bytes"
	"encoding/base64"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestLoadSecretFile(t *testing.T) {
	secret := bytes.Repeat([]byte{0xA5}, SecretLength)
	good := base64.StdEncoding.EncodeToString(secret)
	// What Omnibus writes: Base64.strict_encode64 of 32 hex characters.
	omnibus := base64.StdEncoding.EncodeToString([]byte(strings.Repeat("0123456789abcdef", 2)))
	tests := []struct {
		name     string
		contents string
		want     []byte
		wantErr  string // substring of the error; "" means success
	}{
		{name: "exact", contents: good, want: secret},
		{name: "final newline", contents: good + "\n", want: secret},
		{name: "surrounding whitespace", contents: " \t" + good + "\r\n\n", want: secret},
		{name: "omnibus form", contents: omnibus + "\n", want: []byte(strings.Repeat("0123456789abcdef", 2))},
		{name: "too short", contents: base64.StdEncoding.EncodeToString(secret[:16]),
			wantErr: "must hold the base64 encoding of exactly 32 bytes; it decodes to 16 bytes"},
		{name: "too long", contents: base64.StdEncoding.EncodeToString(append(secret, 1)),
			wantErr: "must hold the base64 encoding of exactly 32 bytes; it decodes to 33 bytes"},
		{name: "empty", contents: "\n", wantErr: "it decodes to 0 bytes"},
		{name: "raw secret, not base64", contents: "this is not base64 at all!!!!!!!", wantErr: "is not valid base64"},
		{name: "url alphabet", contents: base64.URLEncoding.EncodeToString(bytes.Repeat([]byte{0xFF}, 32)), wantErr: "is not valid base64"},
		{name: "missing padding", contents: strings.TrimRight(good, "="), wantErr: "is not valid base64"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "kas_secret")
			if err := os.WriteFile(path, []byte(tt.contents), 0o600); err != nil {
				t.Fatal(err)
			}
			got, err := LoadSecretFile(path)
			if tt.wantErr != "" {
				if err == nil {
					t.Fatalf("LoadSecretFile = %x, want an error", got)
				}
				msg := err.Error()
				if !strings.Contains(msg, tt.wantErr) || !strings.Contains(msg, path) {
					t.Errorf("error %q: want it to name %s and contain %q", msg, path, tt.wantErr)
				}
				if c := strings.TrimSpace(tt.contents); c != "" && strings.Contains(msg, c) {
					t.Errorf("error %q contains the file's contents", msg)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, tt.want) {
				t.Errorf("LoadSecretFile = %x, want %x", got, tt.want)
			}
		})
	}
}

func TestLoadSecretFileMissing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nope")
	_, err := LoadSecretFile(path)
	if err == nil || !strings.Contains(err.Error(), path) || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("error %v: want one naming %s and wrapping fs.ErrNotExist", err, path)
	}
}
