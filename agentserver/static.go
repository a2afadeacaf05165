package agentserver

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"

	"github.com/caddy-kas/caddy-kas/internal/tokenmatch"
)

// StaticAgent is an agent declared by the admin in standalone mode.
type StaticAgent struct {
	ID   int64
	Name string
	// Token is the agent's secret, as agentk sends it. Never log it.
	Token string
}

// StaticAgents authenticates the agents declared in the configuration.
type StaticAgents struct {
	agents []StaticAgent
	tokens *tokenmatch.Set // tokens.Match gives the index into agents
}

// NewStaticAgents checks the declared agents: positive unique ids,
// non-empty names and tokens, no token shared by two agents.
func NewStaticAgents(agents []StaticAgent) (*StaticAgents, error) {
	var errs []error
	ids := map[int64]bool{}
	tokens := make([]string, len(agents))
	for i, a := range agents {
		switch {
		case a.ID <= 0:
			errs = append(errs, fmt.Errorf("agent %q: id must be a positive integer", a.Name))
		case ids[a.ID]:
			errs = append(errs, fmt.Errorf("agent %d: declared twice", a.ID))
		}
		ids[a.ID] = true
		if a.Name == "" {
			errs = append(errs, fmt.Errorf("agent %d: empty name", a.ID))
		}
		if a.Token == "" {
			errs = append(errs, fmt.Errorf("agent %d: empty token", a.ID))
		}
		tokens[i] = a.Token
	}
	for _, i := range tokenmatch.Duplicates(tokens) {
		errs = append(errs, fmt.Errorf("agent %d: same token as another agent", agents[i].ID))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return &StaticAgents{agents: agents, tokens: tokenmatch.New(tokens)}, nil
}

// AuthenticateAgent implements [Authenticator].
func (s *StaticAgents) AuthenticateAgent(_ context.Context, token string) (Agent, error) {
	i := s.tokens.Match(token)
	if i < 0 {
		return Agent{}, ErrUnknownToken
	}
	return Agent{ID: s.agents[i].ID, Name: s.agents[i].Name}, nil
}

// Declares reports whether an agent with this id and a token with this
// SHA-256 digest is among the declared agents. A tunnel whose agent it
// does not declare was authenticated with a revoked token.
func (s *StaticAgents) Declares(agentID int64, credential [sha256.Size]byte) bool {
	i := s.tokens.MatchDigest(credential)
	return i >= 0 && s.agents[i].ID == agentID
}

var _ Authenticator = (*StaticAgents)(nil)
